"""The catalogue of bad input: each case runs the command line as a user would and must exit 2 with one message
that names the culprit (the key, file, row or role), and no traceback. Cheap cases only: each fails before a model
loads. The README's exit-code section points here; a new class of mistake gets a row."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_dpo.cli.main import main
from lora_dpo.config import load_recipe
from lora_dpo.errors import UserError, check_utf8
from lora_dpo.training import loop
from lora_dpo.training.trackers import init_kwargs, project_name

PAIR = {"prompt": "q", "chosen": "good answer", "rejected": "bad"}


def _rows(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture
def world(tmp_path, tiny_llama):
    """A recipe that works (tests/cli/test_cli.py trains it) and its data, for the cases to break."""
    data = _rows(tmp_path / "pairs.jsonl", [{**PAIR, "prompt": f"q{i}"} for i in range(6)])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'run'}\nmodel:\n  name: {tiny_llama}\ndata:\n  train: {data}\n"
                      "  max_length: 24\n  eval_fraction: 0.3\ntrain:\n  max_steps: 2\n  batch_size: 2\n")
    return tmp_path, recipe


def _file(name, content: bytes):
    def make(tmp):
        path = tmp / name
        path.write_bytes(content)
        return path
    return make


def _data(rows):
    return lambda tmp: _rows(tmp / "bad.jsonl", rows)


# (id, command, overrides or a file maker for data.train, what the message must name)
CASES = [
    # syntax and types
    ("unknown key", "train", ["loss.bta=0.2"], "loss.bta"),
    ("unknown section", "train", ["trainer.lr=1e-4"], "'trainer'"),
    ("no equals sign", "train", ["train.lr"], "train.lr"),
    ("a string for a number", "train", ["train.lr=fast"], "train.lr"),
    ("a number for a bool", "train", ["overwrite=3"], "overwrite"),
    ("a float for an integer", "train", ["train.batch_size=2.5"], "train.batch_size"),
    ("a list for a number", "train", ["loss.beta=[1,2]"], "loss.beta"),
    ("a choice that does not exist", "train", ["loss.name=dpoo"], "loss.name"),
    ("a mapping for a key", "train", ["model=3"], "model"),
    # ranges and non-finite numbers
    ("beta zero", "train", ["loss.beta=0"], "loss.beta"),
    ("beta inf", "train", ["loss.beta=.inf"], "loss.beta"),
    ("beta nan", "train", ["loss.beta=.nan"], "loss.beta"),
    ("lr inf", "train", ["train.lr=.inf"], "train.lr"),
    ("lr negative", "train", ["train.lr=-1e-4"], "train.lr"),
    ("epochs inf", "train", ["train.epochs=.inf"], "train.epochs"),
    ("seed negative", "train", ["train.seed=-1"], "train.seed"),
    ("seed beyond numpy", "train", ["train.seed=1099511627776"], "train.seed"),
    ("batch size zero", "train", ["train.batch_size=0"], "train.batch_size"),
    ("max_length zero", "train", ["data.max_length=0"], "data.max_length"),
    ("eval fraction one", "train", ["data.eval_fraction=1.0"], "data.eval_fraction"),
    ("warmup ratio above one", "train", ["train.warmup_ratio=1.5"], "train.warmup_ratio"),
    ("lora rank zero", "train", ["lora.r=0"], "lora.r"),
    ("label smoothing one", "train", ["loss.label_smoothing=0.5"], "loss.label_smoothing"),
    # cross-key rules
    ("rounds without a reference", "train", ["loss.name=simpo", "train.rounds=2"], "train.rounds"),
    ("KTO at batch 1", "train", ["loss.name=kto", "train.batch_size=1"], "train.batch_size"),
    ("online without a judge", "train", ["online.enabled=true"], "online.judge"),
    ("rounds data of the wrong length", "train", ["train.rounds=2", "data.rounds=[a.jsonl,b.jsonl]"], "data.rounds"),
    # paths and files
    ("empty output_dir", "train", ["output_dir="], "output_dir: cannot be empty"),
    ("empty model name", "train", ["model.name="], "model.name: cannot be empty"),
    ("empty data file name", "data", ["data.train="], "data.train: cannot be empty"),
    ("empty eval split", "data", ["data.eval="], "data.eval: cannot be empty (null unsets it)"),
    ("empty data.rounds entry", "train", ["train.rounds=2", "data.rounds=['']"], "data.rounds: cannot be empty"),
    ("missing data file", "train", ["data.train=nope.jsonl"], "nope.jsonl"),
    ("unsupported data file type", "train", _file("pairs.xml", b"<pairs/>"), "pairs.xml"),
    ("data not UTF-8", "train", _file("latin1.jsonl", json.dumps(PAIR).encode().replace(b"good", b"g\xf6od") + b"\n"),
     "latin1.jsonl"),
    ("data not JSON", "train", _file("broken.jsonl", b'{"prompt": "q", "chosen": \n'), "broken.jsonl"),
    ("an empty data file", "train", _file("empty.jsonl", b""), "empty.jsonl"),
    # rows
    ("an empty chosen reply", "train", _data([PAIR, {**PAIR, "chosen": ""}]), "row 1"),
    ("identical replies", "train", _data([PAIR, {**PAIR, "rejected": "good answer"}]), "row 1"),
    ("no recognised layout", "train", _data([{"question": "q", "answer": "a"}]), "bad.jsonl"),
    ("a message without content", "train", _data([{"prompt": [{"role": "user"}], "chosen": [{"role": "assistant",
     "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}]), "row 0"),
    ("an unknown role", "train", _data([{"prompt": [{"role": "robot", "content": "hi"}], "chosen": [{"role":
     "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}]), "'robot'"),
    ("an unknown ShareGPT speaker", "train", _data([{"conversations": [{"from": "alien", "value": "hi"}], "chosen":
     {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}}]), "'alien'"),
    # the data command sees the same mistakes
    ("data: lr inf", "data", ["train.lr=.inf"], "train.lr"),
    ("data: not UTF-8", "data", _file("bad.csv", b"prompt,chosen,rejected\nq,\xff,b\n"), "bad.csv"),
    ("plan: seed negative", "plan", ["train.seed=-5"], "train.seed"),
]


@pytest.mark.parametrize("command, change, culprit", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_naming_the_culprit(world, capsys, monkeypatch, command, change, culprit):
    tmp, recipe = world
    monkeypatch.chdir(tmp)
    for handler in logging.getLogger("datasets").handlers:  # bound to the stderr of the test that first logged
        monkeypatch.setattr(handler, "stream", sys.stderr)
    overrides = change if isinstance(change, list) else [f"data.train={change(tmp)}"]
    argv = [command, str(recipe), *overrides] + (["--gpu-memory", "8GB"] if command == "plan" else [])
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("lora-dpo: error:")]
    assert len(errors) == 1 and culprit in errors[0], err
    assert not (tmp / "run").exists()  # nothing written for a run that never started


def test_a_recipe_that_is_not_utf8_is_named_with_the_byte(tmp_path, capsys):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes(b"output_dir: runs/x\nmodel:\n  name: toy\n# caf\xe9\n")
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "latin1.yaml: not UTF-8 text (byte 43: 0xe9)" in err and "Traceback" not in err


def test_the_utf8_check_finds_a_bad_byte_past_a_character_split_across_blocks(tmp_path):
    path = tmp_path / "big.jsonl"
    text = ("é" * (1 << 20)).encode()  # 2 MiB of two-byte characters, shifted by one byte: every 1 MiB block
    path.write_bytes(b"x" + text + b"\xff")  # ends inside a character
    with pytest.raises(UserError, match=f"byte {1 + len(text)}: 0xff"):
        check_utf8(path, "big.jsonl")
    path.write_bytes(b"x" + text)
    check_utf8(path, "big.jsonl")  # valid: no error
    path.write_bytes(b"x" + text[:-1])
    with pytest.raises(UserError, match="ends inside a character"):
        check_utf8(path, "big.jsonl")


def test_resume_of_a_finished_run_without_checkpoints_refuses_and_keeps_its_adapter(world, capsys):
    tmp, recipe = world
    adapter = tmp / "run" / "adapter" / "adapter_config.json"  # a finished run whose checkpoints were pruned
    adapter.parent.mkdir(parents=True)
    adapter.write_text('{"r": 8}')
    (tmp / "run" / "eval.json").write_text('{"rewards/accuracies": 0.9}')
    assert main(["train", str(recipe), "resume=true"]) == 2
    err = capsys.readouterr().err
    assert "resume: " in err and "nothing to resume" in err and "overwrite=true" in err
    assert adapter.read_text() == '{"r": 8}'


def test_an_output_dir_that_is_a_file_or_cannot_be_written_is_refused(world, capsys, monkeypatch):
    tmp, recipe = world
    (tmp / "afile").write_text("mine")
    assert main(["train", str(recipe), f"output_dir={tmp / 'afile'}"]) == 2
    assert "output_dir: " in capsys.readouterr().err and (tmp / "afile").read_text() == "mine"
    # root may write anywhere, so a read-only folder is simulated: what os.access answers for it
    locked = tmp / "locked"
    locked.mkdir()
    monkeypatch.setattr("lora_dpo.run.rundir.os.access", lambda path, mode: Path(path) != locked)
    assert main(["train", str(recipe), f"output_dir={locked / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert f"output_dir: {locked} cannot be written" in err and "Traceback" not in err


def scorer_of_two_args(text, other):  # a wrong signature: the scorer gets one text
    return 1.0


def scorer_of_words(text):
    return "good"


def judge_of_one_arg(completions):
    return [0.0 for _ in completions]


@pytest.mark.parametrize("key, spec, named", [
    ("eval.scorer", "test_bad_inputs:scorer_of_two_args", "must be a function of one text returning a number"),
    ("eval.scorer", "test_bad_inputs:scorer_of_words", "must return a finite number"),
    ("online.judge", "test_bad_inputs:judge_of_one_arg", "fn(prompt, completions: list[str]) -> list[float]"),
])
def test_user_code_with_the_wrong_signature_is_a_recipe_error_before_the_model_loads(world, capsys, monkeypatch,
                                                                                     key, spec, named):
    tmp, recipe = world
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    extra = ["online.enabled=true"] if key == "online.judge" else []
    assert main(["train", str(recipe), f"{key}={spec}", *extra]) == 2
    err = capsys.readouterr().err
    assert f"{key}: {spec}" in err and named in err and "Traceback" not in err
    assert not (tmp / "run").exists()


def test_a_final_evaluation_that_is_not_finite_is_an_error_and_writes_no_adapter(world, capsys, monkeypatch):
    tmp, recipe = world
    real = loop.Session.evaluation
    monkeypatch.setattr(loop.Session, "evaluation",  # the final evaluation diverged; the baseline did not
                        lambda self, *a, **k: {**real(self, *a, **k), "loss": float("nan")} if self.s.state.step else
                        real(self, *a, **k))
    assert main(["train", str(recipe), "train.save_every=1"]) == 2
    err = capsys.readouterr().err
    assert "the final evaluation is not finite (loss)" in err and "done:" not in err and "Traceback" not in err
    assert f"resume={tmp / 'run' / 'checkpoints' / 'step-2'}" in err
    assert not (tmp / "run" / "adapter").exists() and not (tmp / "run" / "eval.json").exists()


def test_the_data_command_reads_sft_examples_of_a_recipe_that_lora_dpo_sft_runs(world, capsys):
    tmp, recipe = world
    sft = _rows(tmp / "sft.jsonl", [{"prompt": f"q{i}", "completion": "an answer"} for i in range(6)])
    assert main(["data", str(recipe), f"data.train={sft}"]) == 0
    out = capsys.readouterr()
    assert "read as SFT examples" in out.err and "6 rows" in out.out
    assert main(["data", str(recipe), f"data.train={sft}", "stage=dpo"]) == 2  # said explicitly: pairs, refused


def test_resume_refuses_changed_data_by_name_and_a_moved_run_resumes_where_it_is(world, capsys):
    tmp, recipe = world
    assert main(["train", str(recipe), "train.save_every=1"]) == 0  # 2 steps, a checkpoint after each
    data = tmp / "pairs.jsonl"
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    _rows(data, [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in rows])  # every pair swapped
    capsys.readouterr()
    assert main(["train", str(recipe), "resume=true", "train.max_steps=3"]) == 2
    err = capsys.readouterr().err
    assert f"resume: the train data ({data})" in err and "Traceback" not in err
    _rows(data, rows)  # restored: the run goes on, from wherever its folder now is
    (tmp / "run").rename(tmp / "moved")
    assert main(["train", str(recipe), "resume=true", "train.max_steps=3", f"output_dir={tmp / 'moved'}"]) == 0
    steps = [json.loads(line)["step"] for line in (tmp / "moved" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line).get("split") == "train"]
    assert steps == [1, 2, 3]


def test_a_second_run_into_a_folder_in_use_is_refused_and_a_killed_runs_lock_blocks_nothing(world, capsys):
    tmp, recipe = world
    run = tmp / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from filelock import FileLock; "
                               f"lock = FileLock({str(run / '.lock')!r}); lock.acquire(); print('held', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"  # a run training in that folder
        assert main(["train", str(recipe), "overwrite=true"]) == 2
        err = capsys.readouterr().err
        assert f"output_dir: another run is training in {run}" in err and "Traceback" not in err
    finally:
        holder.kill()  # killed as a run may be: its lock goes with it
        holder.wait()
    time.sleep(0.1)
    assert main(["train", str(recipe)]) == 0 and (run / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("broken, named", [
    ("adapter/adapter_model.safetensors", "adapter_model.safetensors"),
    ("optimizer.pt", "optimizer.pt"),
    ("trainer_state.json", "trainer_state.json"),
    ("rng.pt", "rng.pt"),
])
def test_a_broken_checkpoint_is_named_file_by_file_and_resume_falls_back_to_an_intact_one(world, capsys, broken,
                                                                                          named):
    tmp, recipe = world
    assert main(["train", str(recipe), "train.save_every=1", "train.keep_last=2"]) == 0
    newest = tmp / "run" / "checkpoints" / "step-2"
    file = newest / broken
    if broken == "rng.pt":
        file.unlink()  # a missing file
    elif broken.endswith(".json"):
        file.write_text("{garbage")
    else:
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])  # truncated
    capsys.readouterr()
    assert main(["train", str(recipe), f"resume={newest}", "train.max_steps=3"]) == 2
    err = capsys.readouterr().err
    assert f"resume: {newest} is broken: " in err and named in err and "Traceback" not in err
    assert main(["train", str(recipe), "resume=true", "train.max_steps=3"]) == 0
    err = capsys.readouterr().err
    assert f"skipping broken checkpoint {newest}" in err and named in err
    assert "resuming from " + str(tmp / "run" / "checkpoints" / "step-1") in err


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB file system (tmpfs), where the machine lets the tests mount one (root, as in CI)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_disk_stops_the_run_with_one_message_and_keeps_its_checkpoints(world, capsys, small_disk):
    tmp, recipe = world
    run = small_disk / "run"
    assert main(["train", str(recipe), f"output_dir={run}", "train.save_every=1", "train.max_steps=50",
                 "train.keep_last=1"]) == 2
    err = capsys.readouterr().err
    assert f"output_dir: cannot write in {run}" in err and "No space left on device" in err
    assert "resume=true" in err and "Traceback" not in err
    assert not (run / "adapter").exists()  # never a result that was not finished
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert rows and all("step" in r for r in rows)  # metrics not torn


def test_a_tracker_that_is_not_installed_exits_2_before_the_model_loads(world, capsys, monkeypatch):
    tmp, recipe = world
    monkeypatch.setattr("accelerate.utils.imports.is_swanlab_available", lambda: False)
    assert main(["train", str(recipe), "train.report_to=[tensorboard,swanlab]"]) == 2
    err = capsys.readouterr().err
    assert "train.report_to: swanlab is not installed; pip install swanlab" in err and "Traceback" not in err
    assert not (tmp / "run").exists()


def test_a_tracker_run_writes_under_the_users_project_name(world, monkeypatch):
    tmp, recipe = world
    monkeypatch.setenv("WANDB_PROJECT", "not-this-one")  # the key wins over a tracker's environment variable
    assert main(["train", str(recipe), "train.report_to=[tensorboard]", "train.project=my-project"]) == 0
    assert list((tmp / "run" / "my-project").rglob("events.out.tfevents.*"))


def test_the_project_comes_from_the_key_then_the_trackers_variable_and_the_run_is_named():
    base = ["output_dir=runs/r1", "model.name=toy", "data.train=toy", "train.report_to=[tensorboard,wandb,mlflow]"]
    env = {"WANDB_PROJECT": "from-wandb", "MLFLOW_EXPERIMENT_NAME": "from-mlflow"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        assert project_name(load_recipe(None, base)) == "from-wandb"
        assert project_name(load_recipe(None, [*base, "train.project=mine"])) == "mine"
        for k in env:
            mp.delenv(k)
        assert project_name(load_recipe(None, base)) == "lora-dpo"
    assert init_kwargs(load_recipe(None, base), "r1") == {"wandb": {"name": "r1"}, "mlflow": {"run_name": "r1"}}
    assert init_kwargs(load_recipe(None, [*base, "train.run_name=first"]), "r1")["wandb"] == {"name": "first"}
