"""The Train tab's form as users meet it (#19): only recipes in the recipe list, resume filled from the run itself
with what may not change locked, what "replace" deletes said before Start, the form saved as a recipe, the data
previewed as the trainer reads it, the running job's values after a reload, and no run history in the browser.
The tab's functions are called as the page's events call them; the browser test takes the same flows by clicking."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest
import yaml

from lora_dpo.config import load_recipe
from lora_dpo.training.loop import train
from lora_dpo_app.jobs import JobManager, train_command
from lora_dpo_app.main import PRIVATE
from lora_dpo_app.train_tab import KEYS, TrainTab
from lora_dpo_app.workspace import Workspace

TOY = Path(__file__).resolve().parents[2] / "recipes" / "toy.yaml"
ACCELERATE = Path(__file__).resolve().parents[2] / "recipes" / "accelerate"


@pytest.fixture
def ws(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the runs trained here write where the app's jobs write: relative to its root
    recipe = yaml.safe_load(TOY.read_text())
    recipe["output_dir"] = "runs/quick"
    recipe["data"]["max_rows"] = 48
    recipe["train"].update(max_steps=4, save_every=2, eval_every=None)
    recipe["eval"].update(num_prompts=4, max_pairs=8, scorer=None)
    (tmp_path / "recipes" / "accelerate").mkdir(parents=True)
    (tmp_path / "recipes" / "quick.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    (tmp_path / "recipes" / "partial.yaml").write_text("base: quick.yaml\nloss: {beta: 0.3}\n")
    (tmp_path / "recipes" / "accelerate" / "ddp.yaml").write_text((ACCELERATE / "ddp.yaml").read_text())
    (tmp_path / "recipes" / "notes.yaml").write_text("todo: try ipo\n")
    return Workspace.at(tmp_path)


def values_of(tab: TrainTab, recipe: str, **changes) -> list:
    values = tab.load_fields(recipe)
    for key, value in changes.items():
        values[KEYS.index(key)] = value
    return values


def test_only_recipes_are_offered_and_the_others_are_named_with_the_reason(ws):
    assert ws.recipe_files() == ["recipes/partial.yaml", "recipes/quick.yaml"]
    skipped = dict(ws.not_recipes())
    assert skipped["recipes/accelerate/ddp.yaml"].startswith("an accelerate launch config")
    assert skipped["recipes/notes.yaml"] == "keys that are not recipe keys: todo"
    shipped = Workspace.at(ws.root / "fresh")
    shipped.add_shipped_recipes()
    assert not [f for f in shipped.recipe_files() if "accelerate" in f]
    assert {f for f, _ in shipped.not_recipes()} == {f"recipes/accelerate/{p.name}" for p in ACCELERATE.glob("*.yaml")}


def test_resume_fills_the_form_from_the_run_and_locks_what_may_not_change(ws):
    tab = TrainTab(ws, JobManager())
    # a run started with a beta the recipe file does not have, stopped after its checkpoint at step 2
    first = values_of(tab, "recipes/quick.yaml", **{"loss.beta": 0.2, "train.max_steps": 2})
    cmd = tab.command("recipes/quick.yaml", first)
    assert cmd[3:] == ["loss.beta=0.2", "train.max_steps=2"]
    train(load_recipe(ws.root / cmd[2], cmd[3:]))

    # the user comes back: the recipe file's values in the form, ticks resume
    form = values_of(tab, "recipes/quick.yaml", resume=True)
    *updates, note = tab.resume_changed("recipes/quick.yaml", *form)
    got = {key: u["value"] for key, u in zip(KEYS, updates)}
    assert got["loss.beta"] == 0.2 and got["train.max_steps"] == 2 and got["resume"] is True
    locked = {key for key, u in zip(KEYS, updates) if u["interactive"] is False}
    assert {"loss.beta", "train.lr", "model.name", "lora.r", "output_dir"} <= locked
    assert not locked & {"train.max_steps", "train.epochs", "train.save_every", "train.batch_size", "resume"}
    assert "**resume** `runs/quick` from `step-2`" in note and "max steps" in note

    # nothing re-typed but the new step count: the run's own config.yaml resumes, and finishes
    resumed = [got[k] for k in KEYS]
    resumed[KEYS.index("train.max_steps")] = 4
    cmd = tab.command("recipes/quick.yaml", resumed)
    assert cmd[2:] == ["runs/quick/config.yaml", "train.max_steps=4", "resume=true"]
    train(load_recipe(ws.root / cmd[2], cmd[3:]))
    assert load_recipe(ws.runs / "quick" / "config.yaml").loss.beta == 0.2
    assert (ws.runs / "quick" / "eval.json").is_file()

    # unticked: back to the recipe file, every field open
    *updates, _ = tab.resume_changed("recipes/quick.yaml", *values_of(tab, "recipes/quick.yaml"))
    assert all(u["interactive"] is True for u in updates) and updates[KEYS.index("loss.beta")]["value"] == 0.1


def test_resume_without_a_checkpoint_is_unticked_with_a_reason(ws):
    tab = TrainTab(ws, JobManager())
    *updates, _ = tab.resume_changed("recipes/quick.yaml", *values_of(tab, "recipes/quick.yaml", resume=True))
    assert updates[KEYS.index("resume")]["value"] is False


def test_replace_says_what_start_deletes(ws):
    tab = TrainTab(ws, JobManager())
    assert tab.run_note("recipes/quick.yaml", *values_of(tab, "recipes/quick.yaml", overwrite=True)) == ""
    train(load_recipe(ws.recipes / "quick.yaml"))
    note = tab.run_note("recipes/quick.yaml", *values_of(tab, "recipes/quick.yaml", overwrite=False))
    assert "already holds a run" in note and "tick *replace*" in note
    note = tab.run_note("recipes/quick.yaml", *values_of(tab, "recipes/quick.yaml", overwrite=True))
    assert note.startswith("**replace**: Start deletes config.yaml, metrics.jsonl, adapter, eval.json")
    assert "(2 checkpoint(s))" in note


def test_the_form_saves_as_a_recipe_that_loads_back_to_the_same_values(ws):
    tab = TrainTab(ws, JobManager())
    form = values_of(tab, "recipes/quick.yaml", **{"loss.beta": 0.3, "train.warmup_ratio": 0.2, "resume": True})
    update, message = tab.save("mine", "recipes/quick.yaml", *form)
    assert update["value"] == "recipes/mine.yaml" and "recipes/mine.yaml" in update["choices"]
    assert message == "saved the form as `recipes/mine.yaml`"
    again = tab.load_fields("recipes/mine.yaml")
    assert again == values_of(tab, "recipes/quick.yaml", **{"loss.beta": 0.3, "train.warmup_ratio": 0.2,
                                                            "overwrite": False})  # saved with resume, replace off
    with pytest.raises(gr.Error, match="recipes/mine.yaml exists"):
        tab.save("mine", "recipes/quick.yaml", *form)
    with pytest.raises(gr.Error, match="is not a folder inside the app's folders"):
        tab.save("../../escape", "recipes/quick.yaml", *form)


def test_the_data_preview_shows_rows_as_the_trainer_reads_them(ws):
    tab = TrainTab(ws, JobManager())
    rows, report = tab.data_preview("recipes/quick.yaml", *values_of(tab, "recipes/quick.yaml"))
    assert list(rows.columns) == ["row", "prompt", "chosen", "rejected"] and len(rows) == 5
    assert rows["prompt"][0].startswith("<|user|>") and rows["prompt"][0].endswith("<|assistant|>")  # the template
    assert rows["chosen"][0].endswith("<|end|>")  # the reply ends as the template ends a turn
    assert "data report" in report and "standard" in report


def test_after_a_reload_the_form_shows_the_running_jobs_values(ws):
    tab = TrainTab(ws, JobManager())
    command = train_command("recipes/quick.yaml", ["loss.beta=0.4", "train.max_steps=3"])
    tab.jobs.job = SimpleNamespace(command=command, running=lambda: True, recipe=command[4], overrides=command[5:])
    recipe, *values = tab.load_page("recipes/partial.yaml")
    assert recipe == "recipes/quick.yaml"
    assert values[KEYS.index("loss.beta")] == 0.4 and values[KEYS.index("train.max_steps")] == 3


def test_the_app_command_launches_without_run_history(ws, monkeypatch):
    """`lora-dpo app` itself (not only the tour the browser test uses) launches with gradio's run history off."""
    import signal

    from lora_dpo_app import main as app_main

    launched = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: launched.update(kwargs))
    monkeypatch.setattr(app_main.atexit, "register", lambda *a: None)
    before = signal.getsignal(signal.SIGTERM)
    try:
        args = SimpleNamespace(auth=None, share=False, host="127.0.0.1", port=0, workdir=str(ws.root),
                               data_dir=None, allow_code=False)
        assert app_main.run(args) == 0
    finally:
        signal.signal(signal.SIGTERM, before)
    assert launched["run_history"] is False and "runs" not in launched["footer_links"]
    assert {k: launched[k] for k in PRIVATE} == PRIVATE


def test_export_has_a_dry_run_that_lists_the_upload_and_sends_nothing(ws, monkeypatch):
    from lora_dpo_app.export_tab import ExportTab

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # anything that tried the network would fail
    train(load_recipe(ws.recipes / "quick.yaml"))
    result, token = ExportTab(ws).export("runs/quick", "exports/quick", False, False, "bf16", True, "alice/toy-dpo",
                                         True, "hf_SECRETtoken123", True)
    assert "**exported** to `exports/quick`" in result and "**dry run**: nothing uploaded" in result
    assert "adapter_model.safetensors" in result and "hf_SECRET" not in result and token == ""


def test_the_sweep_tab_runs_a_sweep_and_draws_its_frontier_as_points_finish(ws):
    import time

    from lora_dpo_app.sweep_tab import SweepTab

    tab = SweepTab(ws, JobManager())
    changes = "train.max_steps=2\ntrain.save_every=null\neval.num_prompts=4\neval.max_new_tokens=12"
    assert tab.preview("recipes/quick.yaml", changes, "loss.beta=0.1,0.5", "") == (
        "lora-dpo sweep recipes/quick.yaml train.max_steps=2 train.save_every=null eval.num_prompts=4 "
        "eval.max_new_tokens=12 --grid loss.beta=0.1,0.5 --out runs/quick-sweep")
    assert "# not valid yet: --grid loss.bta=1: loss.bta is not a recipe key" in tab.preview(
        "recipes/quick.yaml", "", "loss.bta=1", "")
    assert "not a folder inside the app's folders" in tab.preview("recipes/quick.yaml", "", "loss.beta=1", "/tmp/x")
    assert tab.start("recipes/quick.yaml", changes, "loss.beta=0.1,0.5", "").startswith(
        "started: lora-dpo sweep recipes/quick.yaml")
    deadline = time.monotonic() + 600  # a hang guard, not a speed bound
    while tab.jobs.job.running() and time.monotonic() < deadline:
        time.sleep(1)
    assert tab.jobs.job.proc.returncode == 0, tab.jobs.job.progress().log_tail
    table, picture, text, log = tab.poll()
    assert table["point"][0] == "reference" and sorted(table["point"][1:]) == ["beta-0.1", "beta-0.5"]
    assert picture.endswith("runs/quick-sweep/frontier.png") and Path(picture).is_file()
    assert "data-done='2'" in text and "recommended" in text and "written: runs/quick-sweep/sweep.json" in log
