"""The run's phases in progress.json: a short toy run records each of them, in order, with its progress; the reader
takes a missing, half-written or foreign file as no phases."""

import json
from pathlib import Path

import pytest

from lora_dpo.config import load_recipe
from lora_dpo.errors import UserError
from lora_dpo.methods import PreferenceMethod
from lora_dpo.run import RunDir, read_phases
from lora_dpo.training.loop import train

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "toy.yaml"


def test_a_short_toy_run_records_every_phase_in_order_all_ended(tmp_path):
    out = tmp_path / "run"
    out.mkdir()  # (as the app makes it) holding the progress file of an earlier run: a fresh run starts it anew
    (out / "progress.json").write_text(json.dumps({"phases": [{"name": "an earlier run", "started": 1.0}]}))
    train(load_recipe(RECIPE, [f"output_dir={out}", "data.max_rows=64", "train.max_steps=4", "train.eval_every=2",
                               "train.save_every=null", "eval.max_pairs=16", "eval.num_prompts=4",
                               "train.reference_cache=null"]))  # (no cache: the reference pass runs its bars)
    phases = read_phases(out)
    names = [p["name"] for p in phases]
    expected = ["tokenising data", "tokenising data", "loading the model", "reference pass", "evaluating the reference",
                "sampling the reference", "training", "evaluation", "sampling the policy", "evaluation",
                "sampling the policy", "saving a checkpoint", "saving the adapter"]
    assert [n for n in names if n in expected] == expected, names  # (the training split, then the held-out one)
    assert all(p["ended"] is not None and p["ended"] >= p["started"] for p in phases)
    assert [p["started"] for p in phases] == sorted(p["started"] for p in phases)
    training = phases[names.index("training")]
    total = json.loads(RunDir(out).run_info.read_text())["total_steps"]
    assert training["total"] == training["done"] == total == 4 and training["unit"] == "step"
    periodic, final = [p for p in phases if p["name"] == "evaluation"]
    assert training["started"] < periodic["started"] <= periodic["ended"] <= training["ended"] <= final["started"]
    assert periodic["total"] == periodic["done"] and periodic["unit"] == "batch"  # its bar was its progress
    reference = phases[names.index("reference pass")]
    assert reference["done"] == reference["total"] and "held-out" in reference["detail"]  # its last table
    assert not list(out.glob(".progress.json*"))  # written through a temporary file, renamed into place


def test_a_resumed_run_appends_its_phases_to_those_of_the_run_that_failed(tmp_path, monkeypatch):
    out = tmp_path / "run"
    recipe = [f"output_dir={out}", "data.max_rows=32", "train.max_steps=4", "train.save_every=2",
              "train.eval_every=null", "train.max_nonfinite_steps=1", "eval.max_pairs=8", "eval.num_prompts=0"]
    real = PreferenceMethod.pair_losses

    def nan_from_step_3(self, model, batch, *args):
        loss = real(self, model, batch, *args)
        nan_from_step_3.calls += model.training
        return loss * float("nan") if model.training and nan_from_step_3.calls >= 3 else loss

    nan_from_step_3.calls = 0
    monkeypatch.setattr(PreferenceMethod, "pair_losses", nan_from_step_3)
    with pytest.raises(UserError, match="step-2"):
        train(load_recipe(RECIPE, recipe))
    failed = read_phases(out)
    assert [p["name"] for p in failed][-2:] == ["training", "saving a checkpoint"]  # (step 2's, inside training)
    assert all(p["ended"] is not None for p in failed)  # training too: ended by the failure
    monkeypatch.setattr(PreferenceMethod, "pair_losses", real)
    train(load_recipe(RECIPE, recipe + ["resume=true"]))
    phases = read_phases(out)
    assert phases[: len(failed)] == failed
    first, second = [p for p in phases if p["name"] == "training"]
    assert (first["done"], second["done"], second["total"]) == (3, 4, 4)  # the second from the checkpoint of step 2
    assert first["ended"] <= phases[len(failed)]["started"] and phases[-1]["name"] == "saving the adapter"


def test_read_phases_takes_a_missing_half_written_or_foreign_file_as_no_phases(tmp_path):
    assert read_phases(tmp_path / "no-run") == []
    path = RunDir(tmp_path).progress
    good = {"name": "training", "started": 10.0, "ended": None, "done": 3, "total": 30, "unit": "step", "detail": None}
    text = json.dumps({"updated": 11.0, "phases": [good]})
    for broken in (text[: len(text) // 2], "", "[1, 2]", '{"phases": "training"}', "\xff\xfe", "null"):
        path.write_text(broken, encoding="utf-8", errors="surrogateescape")
        assert read_phases(tmp_path) == [], broken
    path.write_text(json.dumps({"phases": [good, "x", {"name": 3, "started": 1}, {"name": "no start"}]}))
    assert read_phases(tmp_path) == [good]  # entries without a name and a start are left out
    path.write_bytes(b"\x80\x81 not utf-8")
    assert read_phases(str(tmp_path)) == []
