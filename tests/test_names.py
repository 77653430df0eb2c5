"""Names that stand for what lora-dpo builds itself (names.py): `toy` is known wherever it is named, in a process
that never imported the toy world (the app, a script using export or compare), because the toy world is an
installed plugin that the first lookup imports."""

import subprocess
import sys

import pytest

from lora_dpo import names

FRESH = """
import sys
from lora_dpo.data.sources import eval_is_split
from lora_dpo.run.card import is_hub_id
from lora_dpo.methods.judges import check_judge_spec
assert "lora_dpo.toy" not in sys.modules
assert not is_hub_id("toy") and not eval_is_split("toy")  # neither a Hub id nor a split of data.train
check_judge_spec("toy")
assert "lora_dpo.toy" in sys.modules
print("ok")
"""


def test_toy_is_known_in_a_process_that_never_imported_it():
    out = subprocess.run([sys.executable, "-c", FRESH], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


def test_a_registered_name_is_looked_up_by_kind():
    assert names.lookup("model", "toy") is not None and names.lookup("data", "toy") is not None
    assert names.lookup("model", "someone/some-model") is None and not names.registered("someone/some-model")
    with pytest.raises(ValueError, match="unknown kind"):
        names.register("tokenizer", "toy", lambda: None)
