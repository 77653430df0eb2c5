"""The Gradio app, driven through gradio_client as a remote user would: train the toy recipe in a separate
process and watch it finish, refuse a second job, stop one safely, compare reference and tuned answers,
export (the Hub push replaced by a fake that records the token), and refuse paths outside the workspace."""

import re
import time
from pathlib import Path

import pytest
import yaml
from gradio_client import Client
from gradio_client.exceptions import AppError, AuthenticationError

import lora_dpo_app.export_tab as export_tab
from lora_dpo_app.main import build_app, parse_auth
from lora_dpo_app.tour import free_port, launch
from lora_dpo_app.workspace import Workspace
from lora_dpo.config import load_recipe
from lora_dpo.errors import UserError

TOY = Path(__file__).resolve().parents[2] / "recipes" / "toy.yaml"
PROMPTS = "write a review of the night river .\nwrite a review of the silver harbour ."


def write_recipe(path: Path, output_dir: str, **train):
    recipe = yaml.safe_load(TOY.read_text())
    recipe["output_dir"] = output_dir
    recipe["train"].update(train)
    recipe["eval"].update(num_prompts=8, max_pairs=32)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("app-ws")
    write_recipe(root / "recipes" / "quick.yaml", "runs/quick", max_steps=6, eval_every=3, save_every=3)
    write_recipe(root / "recipes" / "long.yaml", "runs/long", max_steps=400, eval_every=None, save_every=None)
    write_recipe(root / "recipes" / "remote-code.yaml", "runs/rc", max_steps=2)
    write_recipe(root / "recipes" / "scorer.yaml", "runs/sc", max_steps=2)
    write_recipe(root / "recipes" / "resume-elsewhere.yaml", "runs/re", max_steps=2)
    for name, key, value in (("remote-code", "model", {"trust_remote_code": True}),
                             ("scorer", "eval", {"scorer": "os:system"}),
                             ("resume-elsewhere", None, {"resume": "/tmp/elsewhere/checkpoints/step-2"})):
        recipe = yaml.safe_load((root / "recipes" / f"{name}.yaml").read_text())
        (recipe[key] if key else recipe).update(value)
        (root / "recipes" / f"{name}.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    (root / "data").mkdir()
    return Workspace.at(root)


@pytest.fixture(scope="module")
def app(ws):
    demo, url = launch(ws)
    yield demo, Client(url, verbose=False)
    demo.jobs.shutdown(timeout=30)
    demo.close()


DRAWN: dict = {}  # the plots as the page last drew them


def status(client) -> dict:
    """The page timer's view. Plots come only when the rows changed since this session last drew them
    (else an empty update): DRAWN keeps the last drawn ones, as the page does."""
    _plots = DRAWN
    progress, *plots, log, outcome = client.predict(api_name="/status")
    for key, value in zip(("loss", "acc", "margin", "kl"), plots):
        if isinstance(value, dict) and "data" in value:
            _plots[key] = value
    loss, acc, margin, kl = (_plots.get(k) for k in ("loss", "acc", "margin", "kl"))
    state = re.search(r"data-state='(\w+)'", progress).group(1)
    step = int(re.search(r"data-step='(\d+)'", progress).group(1)) if "data-step" in progress else 0
    return dict(state=state, step=step, progress=progress, plots=dict(loss=loss, acc=acc, margin=margin, kl=kl),
                log=log, outcome=outcome)


def wait(client, until, timeout=900) -> dict:
    """Poll the status endpoint as the page's timer does until `until(status)`; `timeout` only guards a hang."""
    deadline = time.monotonic() + timeout
    while True:
        s = status(client)
        if until(s) or time.monotonic() > deadline:
            return s
        time.sleep(0.5)


def start(client, recipe: str, **changes):
    values = list(client.predict(recipe, api_name="/load_recipe"))
    keys = ["model", "data", "loss", "beta", "lr", "epochs", "batch", "accum", "max_length", "r", "alpha",
            "output_dir", "overwrite", "resume"]
    for key, value in changes.items():
        values[keys.index(key)] = value
    return client.predict(recipe, *values, api_name="/start")


@pytest.fixture(scope="module")
def quick_run(app, ws):
    demo, client = app
    message = start(client, "recipes/quick.yaml")
    final = wait(client, lambda s: s["state"] in ("finished", "failed"))
    return message, final


def test_start_trains_in_a_subprocess_and_the_page_shows_progress_plots_and_final_metrics(app, ws, quick_run):
    demo, client = app
    message, final = quick_run
    assert message.startswith("started: lora-dpo train recipes/quick.yaml")
    assert final["state"] == "finished", final["log"]
    assert "step 6 of 6" in final["progress"]
    loss = final["plots"]["loss"]["data"]
    assert [row[0] for row in loss] == [1, 2, 3, 4, 5, 6]  # the training rows; eval is in the final table
    assert all(len(final["plots"][k]["data"]) == 6 for k in ("acc", "margin", "kl"))
    assert "done: runs/quick" in final["log"]
    assert "**finished**" in final["outcome"] and "| behaviour |" in final["outcome"]
    run = ws.runs / "quick"
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and (run / "eval.json").is_file()
    assert isinstance(demo.jobs.job.proc.args, list)  # an argument list, never a shell string
    assert "train recipes/quick.yaml" in (run / "app-train.log").read_text()


def test_edited_fields_become_overrides_in_the_command(app):
    demo, client = app
    values = list(client.predict("recipes/quick.yaml", api_name="/load_recipe"))
    assert values[:4] == ["toy", "toy", "dpo", 0.1]
    values[3], values[4], values[11] = 0.25, 0.0005, "runs/other"
    assert client.predict("recipes/quick.yaml", *values, api_name="/preview") == (
        "lora-dpo train recipes/quick.yaml loss.beta=0.25 train.lr=0.0005 output_dir=runs/other")


def test_a_second_start_is_refused_and_stop_checkpoints(app, ws, quick_run):
    demo, client = app
    start(client, "recipes/long.yaml")
    with pytest.raises(AppError, match="already running"):
        start(client, "recipes/quick.yaml")
    s = wait(client, lambda s: s["step"] >= 2 or s["state"] != "running" and s["state"] != "starting")
    assert s["state"] == "running", s["log"]
    assert "remaining" in s["progress"] and "<progress" in s["progress"]
    assert client.predict(api_name="/stop").startswith("stopping")
    # a second click must not become the trainer's "second Ctrl-C" (stop at once, no checkpoint)
    assert client.predict(api_name="/stop").startswith(("already stopping", "no training job"))
    s = wait(client, lambda s: s["state"] not in ("running", "starting"))
    assert s["state"] == "stopped" and demo.jobs.job.proc.returncode == 130
    # save_every is off: the only checkpoint is the one the safe stop wrote, and the page names it
    checkpoints = [p.parent.name for p in (ws.runs / "long" / "checkpoints").glob("step-*/trainer_state.json")]
    assert len(checkpoints) == 1 and f"checkpoint `{checkpoints[0]}` saved" in s["outcome"]
    assert 2 <= int(checkpoints[0].split("-")[1]) < 400


def test_a_failed_run_shows_its_error(app):
    demo, client = app
    start(client, "recipes/quick.yaml", output_dir="runs/failing", data="data/missing.jsonl")
    s = wait(client, lambda s: s["state"] not in ("running", "starting"))
    assert s["state"] == "failed"
    assert "lora-dpo: error: data/missing.jsonl: no such file" in s["outcome"]


@pytest.mark.parametrize("changes, message", [
    (dict(output_dir="/tmp/elsewhere"), "output_dir: /tmp/elsewhere is not a folder inside the app's folders"),
    (dict(output_dir="runs/../../escape"), "output_dir: runs/../../escape is not a folder inside"),
    (dict(output_dir="runs"), "output_dir: runs is not a folder inside the app's folders (runs/)"),
    (dict(data="../secrets/pairs.jsonl"), "data.train: ../secrets/pairs.jsonl is not inside the app's folders"),
    (dict(model="/etc"), "model.name: /etc is not inside"),
    (dict(beta=-1), "loss.beta"),
])  # fmt: skip
def test_bad_fields_and_paths_outside_the_workspace_are_refused(app, changes, message):
    demo, client = app
    with pytest.raises(AppError, match=re.escape(message)):
        start(client, "recipes/quick.yaml", **changes)


@pytest.mark.parametrize("recipe, message", [
    ("recipes/remote-code.yaml", "model.trust_remote_code: the app does not run a model's own code"),
    ("recipes/scorer.yaml", "eval.scorer: os:system is code outside lora_dpo"),
    ("recipes/resume-elsewhere.yaml", "resume: /tmp/elsewhere/checkpoints/step-2 is not inside the app's folders"),
])  # fmt: skip
def test_recipes_that_would_run_outside_code_or_unpickle_outside_files_are_refused(app, recipe, message):
    demo, client = app
    with pytest.raises(AppError, match=re.escape(message)):
        start(client, recipe)


def test_compare_fills_both_panes_and_the_table(app, quick_run):
    demo, client = app
    table, left, right, note = client.predict("runs/quick", "(none)", PROMPTS, 1.0, 1.0, 40, 1, "first adapter",
                                              api_name="/compare")
    assert table["headers"] == ["prompt", "reference", "reward (reference)", "tuned", "reward (tuned)"]
    assert [row[0] for row in table["data"]] == PROMPTS.splitlines()
    # the panes show the first prompt's answers, each labelled with its reward
    assert left["value"] == table["data"][0][1] and right["value"] == table["data"][0][3]
    assert left["value"].strip() and right["value"].strip()
    assert left["label"] == f"reference · reward {table['data'][0][2]:+.3f}" and right["label"].startswith("tuned")
    assert all(isinstance(row[2], float) and isinstance(row[4], float) for row in table["data"])
    assert "adapter disabled" in note
    with pytest.raises(AppError, match="is not inside the app's folders"):
        client.predict("/etc", "(none)", PROMPTS, 1.0, 1.0, 8, 1, "first adapter", api_name="/compare")


def test_export_writes_the_adapter_and_the_token_is_used_once_and_forgotten(app, ws, quick_run, monkeypatch, capfd):
    demo, client = app
    seen = {}

    class Pushed:
        def listing(self):
            return "uploaded 5 files to alice/toy-dpo"

    def fake_push(folder, repo_id, private=False, token=None, **kw):
        seen.update(folder=Path(folder), repo_id=repo_id, private=private, token=token)
        return Pushed()

    monkeypatch.setattr(export_tab, "push", fake_push)
    secret = "hf_SECRETtoken1234567890"
    result, token_field = client.predict("runs/quick", "exports/quick", False, False, "bf16", True, "alice/toy-dpo",
                                         True, secret, api_name="/export")
    assert token_field == ""
    assert "**exported** to `exports/quick`" in result and "**pushed**" in result and secret not in result
    assert seen == dict(folder=ws.exports / "quick", repo_id="alice/toy-dpo", private=True, token=secret)
    assert (ws.exports / "quick" / "adapter_model.safetensors").is_file()
    assert "alice/toy-dpo" in (ws.exports / "quick" / "README.md").read_text()
    for path in ws.root.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    out, err = capfd.readouterr()
    assert secret not in out + err
    result, token_field = client.predict("runs/quick", "exports/quick", False, False, "bf16", True, "alice/toy-dpo",
                                         True, secret, api_name="/export")
    assert "**error**" in result and "already exists" in result and token_field == ""  # emptied on errors too
    result, token_field = client.predict("runs/quick", "exports", True, False, "bf16", False, "", True, "",
                                         api_name="/export")
    assert "is not a folder inside the app's folders" in result  # "replace" never empties exports/ itself
    assert (ws.exports / "quick" / "adapter_model.safetensors").is_file()

    def failing_push(folder, repo_id, private=False, token=None, **kw):
        raise RuntimeError(f"401 Unauthorized: Authorization: Bearer {token}")

    monkeypatch.setattr(export_tab, "push", failing_push)
    result, token_field = client.predict("runs/quick", "exports/quick2", False, False, "bf16", True, "alice/toy-dpo",
                                         True, secret, api_name="/export")
    assert "**error**: RuntimeError: 401 Unauthorized" in result and secret not in result and token_field == ""


def test_login_is_required_when_asked(ws, monkeypatch):
    demo = build_app(ws)
    demo.queue()
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, server_port=free_port(), auth=("ann", "pw-1"))
    try:
        with pytest.raises(AuthenticationError, match="credentials were not provided"):
            Client(url, verbose=False)
        with pytest.raises(ValueError, match="Could not login"):
            Client(url, auth=("ann", "wrong"), verbose=False)
        assert Client(url, auth=("ann", "pw-1"), verbose=False).predict("recipes/quick.yaml", api_name="/load_recipe")
    finally:
        demo.close()
    monkeypatch.setenv("LORA_DPO_APP_AUTH", "bob:secret")
    assert parse_auth(None) == ("bob", "secret") and parse_auth("ann:pw") == ("ann", "pw")
    with pytest.raises(UserError, match="USER:PASSWORD"):
        parse_auth("no-colon")


def test_the_app_binds_to_localhost_unless_told(capsys):
    from lora_dpo.cli.main import parser as _parser

    args = _parser().parse_args(["app"])
    assert args.host == "127.0.0.1" and args.share is False and args.auth is None


def test_uploaded_recipe_is_checked_and_saved_under_recipes(ws, tmp_path):
    import gradio as gr

    from lora_dpo_app.jobs import JobManager
    from lora_dpo_app.train_tab import TrainTab

    tab = TrainTab(ws, JobManager())
    good = tmp_path / "mine.yaml"
    good.write_text((ws.recipes / "quick.yaml").read_text())
    update, message = tab.upload(str(good))
    assert (ws.recipes / "uploads" / "mine.yaml").is_file() and update["value"] == "recipes/uploads/mine.yaml"
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lrr: 1\n")
    with pytest.raises(gr.Error, match="train.lrr"):
        tab.upload(str(bad))
    assert not (ws.recipes / "uploads" / "bad.yaml").exists()


def test_an_empty_folder_gets_the_shipped_recipes_and_an_existing_one_is_left_alone(tmp_path):
    empty = Workspace.at(tmp_path / "fresh")
    assert empty.add_shipped_recipes() >= 10
    assert "recipes/toy.yaml" in empty.recipe_files() and "recipes/qwen2.5-1.5b-8gb.yaml" in empty.recipe_files()
    load_recipe(empty.recipes / "toy-kto.yaml")  # its base: toy.yaml is beside it
    mine = tmp_path / "mine"
    (mine / "recipes").mkdir(parents=True)
    (mine / "recipes" / "only.yaml").write_text("output_dir: runs/only\n")
    assert Workspace.at(mine).add_shipped_recipes() == 0
    assert Workspace.at(mine).recipe_files() == ["recipes/only.yaml"]
