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
    return client.predict(recipe, *form(client, recipe, **changes), api_name="/start")


SHORT = {"model": "model.name", "data": "data.train", "beta": "loss.beta", "lr": "train.lr"}  # names used below


def form(client, recipe: str, **changes) -> list:
    """The Train tab's fields for `recipe`, as the page loads them, with `changes` (by short name or by the
    key's last part: output_dir, max_steps, ...) applied."""
    from lora_dpo_app.train_tab import KEYS

    values = list(client.predict(recipe, api_name="/load_recipe"))
    for name, value in changes.items():
        key = SHORT.get(name) or next(k for k in KEYS if k.rsplit(".", 1)[-1] == name)
        values[KEYS.index(key)] = value
    return values


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
    values = form(client, "recipes/quick.yaml", beta=0.25, lr=0.0005, output_dir="runs/other", max_steps=9,
                  warmup_ratio=0.2, save_every=4)
    assert client.predict("recipes/quick.yaml", *values, api_name="/preview") == (
        "lora-dpo train recipes/quick.yaml loss.beta=0.25 train.lr=0.0005 train.max_steps=9 train.warmup_ratio=0.2 "
        "train.save_every=4 output_dir=runs/other")


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


# ---------------------------------------------------------------- Compare's summary and differences, the Chat tab
import gradio as gr  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from lora_dpo.compare import Comparer, Sampling  # noqa: E402
from lora_dpo.toy.build import BASE  # noqa: E402
from lora_dpo.training.loop import train  # noqa: E402
from lora_dpo_app.chat_tab import ChatTab, conversation, prompt_ids, stream_reply  # noqa: E402
from lora_dpo_app.compare_tab import (BARELY_MOVED, DEL, INS, CompareTab, barely_moved,  # noqa: E402
                                      differences_html, movement, word_diff_html)

CHAT_PROMPTS = ["write a review of the night river .", "write a review of the silver harbour .",
                "write a review of the last garden ."]


def test_word_diff_marks_the_words_only_in_one_answer_and_escapes_html():
    # difflib's opcodes: equal "i", replace "loved"->"watched", equal "it . the music seemed", replace "loud"->"bland",
    # equal "."
    assert word_diff_html("i loved it . the music seemed loud .", "i watched it . the music seemed bland .") == (
        f"i {DEL}loved</del> {INS}watched</ins> it . the music seemed {DEL}loud</del> {INS}bland</ins> .")
    assert word_diff_html("a <b>", "a <b> c") == f"a &lt;b&gt; {INS}c</ins>"
    assert word_diff_html("same  words\n", "same words") == "same words"


def test_differences_view_has_one_block_per_prompt_and_says_when_answers_are_identical():
    rows = [dict(prompt="p<1>", answers={"reference": "a b", "tuned": "a c"}, rewards={}, score_with="tuned"),
            dict(prompt="p2", answers={"reference": "x y", "tuned": "x  y"}, rewards={}, score_with="tuned")]
    out = differences_html(rows)
    assert out.count('class="diff-row"') == 2 and "<b>p&lt;1&gt;</b>" in out
    assert f"a {DEL}b</del> {INS}c</ins>" in out
    assert "<b>p2</b></p><p><i>identical answers:</i> x y</p>" in out
    assert "only in <b>reference</b>" in out and "only in <b>tuned</b>" in out


def test_barely_moved_needs_a_small_margin_in_nats_and_a_small_kl():
    # margin / beta below 0.1 nats: the toy run after 10 steps (0.0096 / 0.1 = 0.096), whose greedy answers
    # equal the reference's; after 15 steps (0.0157 / 0.1 = 0.157) they differ
    assert barely_moved({"rewards/margins": 0.0096, "kl": 0.0004, "beta": 0.1})
    assert not barely_moved({"rewards/margins": 0.0157, "kl": 0.0005, "beta": 0.1})
    assert barely_moved({"rewards/margins": -0.04, "kl": 0.001, "beta": 0.5})  # 0.08 nats
    assert not barely_moved({"rewards/margins": 0.005, "kl": -0.2, "beta": 0.1})  # moved: both answers pushed down
    assert barely_moved({"rewards/margins": 0.005})  # no beta: the default 0.1
    assert not barely_moved({"loss": 1.2, "ppl": 3.3})  # SFT: no margin, nothing to say


def test_movement_shows_final_kl_and_margin_beside_the_reference_and_the_note_when_barely_moved():
    final = {"step": 10, "kl": 0.0004, "rewards/margins": 0.0096, "beta": 0.1,
             "baseline": {"kl": 0.0, "rewards/margins": 0.0}}
    line = movement("tuned", "runs/toy", final)
    assert line.startswith("**tuned** (`runs/toy`), held out after 10 steps: ")
    assert "KL to the reference **0.0004** nats/token (reference 0.0000)" in line
    assert "reward margin **0.0096** (reference 0.0000)" in line and BARELY_MOVED in line
    moved = movement("A", "runs/a", {**final, "rewards/margins": 0.74, "kl": -0.21})
    assert "**0.7400**" in moved and BARELY_MOVED not in moved
    assert "unknown" in movement("tuned", "exports/x", None)
    assert "no KL or reward margin" in movement("tuned", "runs/sft", {"step": 3, "loss": 1.0})


def test_conversation_takes_gradio_messages_and_the_template_renders_every_turn():
    history = [{"role": "user", "content": [{"type": "text", "text": "hi"}], "metadata": None},
               {"role": "assistant", "content": "hello"},
               {"role": "user", "content": "more"}, {"role": "assistant", "content": ""}]  # a stopped reply
    messages = conversation(history, "again")
    assert messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                        {"role": "user", "content": "more"}, {"role": "user", "content": "again"}]
    tok = AutoTokenizer.from_pretrained(BASE)
    two = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
           {"role": "user", "content": "again"}]
    text = "<|user|>hi<|end|><|assistant|>hello<|end|><|user|>again<|end|><|assistant|>"  # the toy's template
    ids, dropped = prompt_ids(tok, two, window=None, max_new_tokens=48)
    assert ids == tok(text, add_special_tokens=False)["input_ids"] and dropped == 0
    last = tok("<|user|>again<|end|><|assistant|>", add_special_tokens=False)["input_ids"]
    # the window keeps the newest turn: the oldest user turn and its reply go together, whole
    assert prompt_ids(tok, two, window=len(ids) - 1 + 4, max_new_tokens=4) == (last, 2)
    assert prompt_ids(tok, two, window=len(ids) + 4, max_new_tokens=4) == (ids, 0)
    system = [{"role": "system", "content": "be brief"}, *two]
    kept, dropped = prompt_ids(tok, system, window=2 * len(last) + 12, max_new_tokens=400)  # half the window: prompt
    assert dropped == 2 and kept == tok("<|system|>be brief<|end|><|user|>again<|end|><|assistant|>",
                                        add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def chat_run(ws):
    """A toy run trained 30 steps (3 s): enough that greedy answers with the adapter on and off differ (from
    about 15 steps; after 10 they are still identical)."""
    out = ws.runs / "chat"
    train(load_recipe(TOY, [f"output_dir={out}", "train.max_steps=30", "train.eval_every=null",
                            "train.save_every=null", "eval.num_prompts=8", "eval.max_pairs=32"]))
    return "runs/chat"


def test_chat_streams_the_tuned_and_the_reference_answer_and_they_differ(ws, chat_run):
    comparer = Comparer.load([str(ws.root / chat_run)])
    greedy = Sampling(temperature=0.0, max_new_tokens=48)
    answers = {}
    for adapter in (True, False):
        for prompt in CHAT_PROMPTS:
            steps = list(stream_reply(comparer, conversation([], prompt), adapter, greedy))
            assert len(steps) > 3 and all(steps[-1].startswith(s) for s in steps)  # streamed: the text grows
            answers[adapter, prompt] = steps[-1]
    assert all(answers.values())
    assert any(answers[True, p] != answers[False, p] for p in CHAT_PROMPTS)
    # a one-turn chat answers as the Compare tab does (same encoding, same sampling loop's settings)
    rows = comparer.compare(CHAT_PROMPTS, greedy)
    assert [(r.answers["tuned"], r.answers["reference"]) for r in rows] == [
        (answers[True, p], answers[False, p]) for p in CHAT_PROMPTS]
    follow = conversation([{"role": "user", "content": CHAT_PROMPTS[0]},
                           {"role": "assistant", "content": answers[True, CHAT_PROMPTS[0]]}], CHAT_PROMPTS[1])
    assert list(stream_reply(comparer, follow, True, greedy))[-1].strip()
    # a stream closed early (the page cleared) stops generate() and frees the model
    stream = stream_reply(comparer, conversation([], CHAT_PROMPTS[0]), True, Sampling(max_new_tokens=1000))
    next(stream)
    stream.close()
    again = list(stream_reply(comparer, conversation([], CHAT_PROMPTS[0]), True, greedy))[-1]
    assert again == answers[True, CHAT_PROMPTS[0]]


def test_chat_tab_keeps_the_model_loaded_and_refuses_paths_outside_the_workspace(ws, chat_run):
    compare = CompareTab(ws)
    tab = ChatTab(compare)
    *_, (chat, box, note) = tab.respond(chat_run, True, [], CHAT_PROMPTS[0], 0, 1, 48, 0)
    assert [m["role"] for m in chat] == ["user", "assistant"] and chat[1]["content"] and box == ""
    assert note.startswith("answered by: **tuned (adapter on)**, base **toy**")
    loaded = compare.comparer(chat_run, "(none)")
    *_, (chat2, _, note2) = tab.respond(chat_run, False, chat, CHAT_PROMPTS[1], 0, 1, 48, 0)
    assert compare.comparer(chat_run, "(none)") is loaded  # loaded once, kept
    assert [m["role"] for m in chat2] == ["user", "assistant", "user", "assistant"] and "reference" in note2
    with pytest.raises(gr.Error, match="is not inside the app's folders"):
        list(tab.respond("/etc", True, [], "hi", 0, 1, 48, 0))
    with pytest.raises(gr.Error, match="type a message"):
        list(tab.respond(chat_run, True, [], "  ", 0, 1, 48, 0))
    summary, diff = compare.details(chat_run, "(none)", [], False)
    final = yaml.safe_load((ws.runs / "chat" / "eval.json").read_text())
    assert f"reward margin **{final['rewards/margins']:.4f}**" in summary and BARELY_MOVED not in summary
    assert diff["visible"] is False


# ------------------------------------------------------------------------------------ Stop, in all its levels
import signal  # noqa: E402
import sys  # noqa: E402

from lora_dpo_app.jobs import JobManager, train_command  # noqa: E402
from lora_dpo_app.train_tab import _outcome, _progress_html  # noqa: E402

EARLY_STOP = "lora-dpo: stopped before training began: nothing was trained, no checkpoint written; start again to train"
# fake trainers: one deaf to SIGINT, one that ends on the second (the trainer's "stop at once"), as exit code 130
DEAF = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); print('ready', flush=True); time.sleep(600)"
ANSWERS_THE_SECOND = ("import signal, sys, time\n"
                      "def at_once(*_): print('stopped at once', flush=True); sys.exit(130)\n"
                      "signal.signal(signal.SIGINT, lambda *_: signal.signal(signal.SIGINT, at_once))\n"
                      "print('ready', flush=True); time.sleep(600)")


def until(condition, timeout=120):
    """Wait for `condition()`; `timeout` only guards a hang."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def fake_job(jobs, run_dir: Path, script: str):
    job = jobs.start([sys.executable, "-c", script], run_dir, run_dir.parent)
    until(lambda: "ready" in job.progress().log_tail)
    return job


def test_stop_while_preparing_ends_a_trainer_started_with_sigint_ignored(ws):
    jobs = JobManager()
    inherited = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the app started in the background by a shell
    try:
        job = jobs.start(train_command("recipes/long.yaml", ["output_dir=runs/prep-stop"]), ws.runs / "prep-stop",
                         ws.root)
    finally:
        signal.signal(signal.SIGINT, inherited)
    until(lambda: "loading PyTorch" in job.progress().log_tail or not job.running())
    assert jobs.stop().startswith("stopping safely: the trainer finishes this step")
    job.proc.wait(120)  # a hang guard: it ends within seconds, not after the 60 s grace period
    p = job.progress()
    assert p.returncode == 130 and p.state == "stopped" and p.stop_kind == "safe" and p.checkpoint is None, p.log_tail
    assert p.log_tail.strip().splitlines()[-1] == EARLY_STOP and "Traceback" not in p.log_tail
    assert _outcome(p).startswith("**stopped** before training began: nothing was trained")
    assert "data-state='stopped'" in _progress_html(p)


def test_stop_escalates_to_at_once_then_kill_when_the_trainer_does_not_answer(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-4" / "adapter").mkdir(parents=True)  # an earlier job's checkpoint
    (run / "checkpoints" / "step-4" / "trainer_state.json").write_text("{}")
    jobs = JobManager(grace_s=1)
    job = fake_job(jobs, run, DEAF)
    message = jobs.stop()
    assert message.startswith("stopping safely") and "if it has not stopped in 1 s it is stopped at once" in message
    p = job.progress()
    assert p.stop_kind == "safe" and p.state in ("starting", "running") and "stopping safely" in _progress_html(p)
    until(lambda: job.stop_kind == "at once")  # nobody clicked: the grace period ran out
    assert job.running() and "stopping at once" in _progress_html(job.progress())
    until(lambda: not job.running())
    p = job.progress()
    assert (p.state, p.stop_kind, p.stop_by, p.returncode) == ("stopped", "killed", "grace", -signal.SIGKILL)
    assert _outcome(p) == ("**killed**: the trainer did not answer Stop within 1 s of the stop at once; no "
                           "checkpoint of this step (the newest is `step-4`: tick *resume* and start again to "
                           "continue from it)")
    assert jobs.stop() == "no training job is running"


def test_a_safe_stop_waits_while_the_trainer_shows_signs_of_life(tmp_path):
    """The grace period of the safe stop runs from the trainer's last write (log, metrics, progress.json): a long
    evaluation or checkpoint under way is not hurried into the stop at once, a silent trainer is."""
    import os

    jobs = JobManager(grace_s=30)
    job = fake_job(jobs, tmp_path / "run", DEAF)
    try:
        jobs.stop()
        long_ago = time.time() - 1000
        job._stop_sent_at = long_ago
        os.utime(job.log_path, (long_ago, long_ago))
        assert job._deadline() == pytest.approx(long_ago + 30)  # silent since: due
        os.utime(job.log_path)  # the trainer wrote its log just now
        assert job._deadline() > time.time() + 25 and job.next_stop_in() > 25
    finally:
        job.kill()


def test_each_click_of_stop_escalates_at_once_but_a_double_click_is_one(tmp_path):
    jobs = JobManager(grace_s=600)
    job = fake_job(jobs, tmp_path / "double", DEAF)
    assert jobs.stop().startswith("stopping safely")
    assert jobs.stop().startswith("already stopping safely")  # within DOUBLE_CLICK_S: the same click
    assert job.stop_kind == "safe"
    job.kill()

    jobs = JobManager(grace_s=600, double_click_s=0)
    job = fake_job(jobs, tmp_path / "second", ANSWERS_THE_SECOND)
    assert jobs.stop().startswith("stopping safely")
    assert jobs.stop().startswith("stopping at once: the step in flight is not saved")
    until(lambda: not job.running())
    p = job.progress()
    assert (p.state, p.stop_kind, p.stop_by, p.returncode) == ("stopped", "at once", "click", 130)
    assert _outcome(p) == ("**stopped at once** on a second Stop: no checkpoint of this step (there is none to "
                           "resume from: start again)")

    job = fake_job(jobs, tmp_path / "third", DEAF)
    jobs.stop(), jobs.stop()
    assert jobs.stop().startswith("killed the trainer")
    p = job.progress()
    assert (p.state, p.stop_kind, p.returncode) == ("stopped", "killed", -signal.SIGKILL)
    assert _outcome(p).startswith("**killed**: Stop clicked a third time")
