"""A finished run as export and compare read it (run/source.py): the adapter, the recipe, the final metrics, and
the beta the adapter was trained to, which adaptive beta moves away from the recipe's loss.beta."""

import json
import shutil

import yaml

from lora_dpo.run import RunDir, resolve_source


def make_run(tmp_path, adapter, final: dict):
    run = RunDir(tmp_path / "run")
    shutil.copytree(adapter, run.adapter)
    run.config.write_text(yaml.safe_dump({"model": {"name": "some/base"}, "loss": {"beta": 0.1}}))
    run.write_json(run.eval, final)
    step = run.checkpoint(3)
    shutil.copytree(adapter, step / "adapter")
    (step / "trainer_state.json").write_text(json.dumps({"step": 3, "beta": 0.25}))
    return run


def test_rewards_use_the_beta_a_run_ended_with(tmp_path, strong_adapter):
    run = make_run(tmp_path, strong_adapter, {"beta": 0.37, "rewards/margins": 1.0})
    src = resolve_source(run.path)
    assert (src.beta, src.base_name, src.final["rewards/margins"]) == (0.37, "some/base", 1.0)  # not loss.beta 0.1
    assert resolve_source(run.checkpoint(3)).beta == 0.25  # a checkpoint: the beta of its step
    assert resolve_source(run.adapter).beta == 0.37  # the run's adapter/ folder knows its run


def test_a_run_without_a_recorded_beta_uses_its_recipe(tmp_path, strong_adapter):
    run = make_run(tmp_path, strong_adapter, {"rewards/margins": 1.0})  # eval.json from before beta was recorded
    assert resolve_source(run.path).beta == 0.1
    assert resolve_source(strong_adapter).beta is None  # a bare adapter: compare falls back to LossConfig().beta
