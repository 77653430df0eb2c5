"""The loop's step path turns no tensor into a Python number per micro-batch (each such conversion is a
host-device sync on a GPU): one per optimizer step (whether to apply it), and the metrics once per logged step.
A regression guard: it counts the conversions lora-dpo's own code makes."""

import collections
import json
import sys

import pytest
import torch

from lora_dpo.config import load_recipe
from lora_dpo.training import loop
from lora_dpo.training.loop import train

CONVERSIONS = ("item", "tolist", "__float__", "__int__", "__bool__")


@pytest.fixture
def counted(monkeypatch):
    """Counts, per call of the loop's `Session.step`, the tensor -> Python conversions made by lora_dpo code."""
    per_step: list[collections.Counter] = []
    current: dict = {"counter": None}

    for name in CONVERSIONS:
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if current["counter"] is not None and caller.startswith("lora_dpo."):
                current["counter"][f"{caller}.{_name}"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    step = loop.Session.step

    def counted_step(self, *args, **kwargs):
        current["counter"] = collections.Counter()
        try:
            return step(self, *args, **kwargs)
        finally:
            per_step.append(current["counter"])
            current["counter"] = None

    monkeypatch.setattr(loop.Session, "step", counted_step)
    return per_step


@pytest.mark.parametrize("grad_accum", [1, 3])
def test_a_step_converts_once_whatever_its_micro_batches(counted, tiny_qwen2, tmp_path, grad_accum):
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"question {i} : is it good ?", "chosen": f"yes it is good {i % 3}",
                                          "rejected": f"no it is bad {i % 5}"}) for i in range(24)))
    train(load_recipe(None, [f"output_dir={tmp_path / 'run'}", f"model.name={tiny_qwen2}", f"data.train={data}",
                             "data.max_length=32", "data.eval_fraction=0", "lora.r=4", "train.batch_size=2",
                             f"train.grad_accum={grad_accum}", "train.max_steps=4", "train.log_every=100",
                             "train.save_every=null", "train.reference_cache=null", "eval.num_prompts=0"]))
    assert len(counted) == 4
    # the first step draws the epoch's order of examples (a CPU permutation, once per epoch); after it, each step
    # makes exactly one conversion: whether to apply it
    for counter in counted[1:]:
        assert dict(counter) == {"lora_dpo.training.loop.tolist": 1}
