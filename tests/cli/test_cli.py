"""The command line as users run it: exit codes and one clear message, never a traceback, for bad input."""

import json
import subprocess
import sys



def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "lora_dpo", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300, env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                                                     "PATH": "/usr/bin:/bin"})


def assert_user_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("lora-dpo: error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_train_succeeds_and_writes_the_run(recipe, tmp_path):
    result = run_cli("train", recipe)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()
    assert "done:" in result.stderr


def test_unknown_key_exits_2_with_suggestion(recipe):
    assert_user_error(run_cli("train", recipe, "loss.bta=0.2"), "unknown key 'loss.bta'", "did you mean 'loss.beta'")


def test_out_of_range_value_exits_2(recipe):
    assert_user_error(run_cli("train", recipe, "loss.beta=0"), "loss.beta: must be > 0")


def test_missing_recipe_exits_2(tmp_path):
    assert_user_error(run_cli("train", tmp_path / "missing.yaml"), "missing.yaml: no such file")


def test_missing_data_file_exits_2_naming_it(recipe, tmp_path):
    assert_user_error(run_cli("train", recipe, f"data.train={tmp_path / 'nope.jsonl'}"), "nope.jsonl")


def test_malformed_rows_exit_2_naming_the_row(recipe, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "a", "chosen": "x", "rejected": "y"},
        {"prompt": "b", "chosen": "", "rejected": "y"},
        {"prompt": "c", "chosen": "same", "rejected": "same"},
    ]))
    assert_user_error(run_cli("train", recipe, f"data.train={bad}"), "row 1", "row 2", "data.on_bad_rows=skip")
    assert not (tmp_path / "run").exists()  # nothing written for a run that never started


def test_unknown_model_exits_2_naming_the_key(recipe, tmp_path):
    assert_user_error(run_cli("train", recipe, f"model.name={tmp_path / 'no-model'}"), "model.name")


def test_bad_arguments_exit_2():
    assert run_cli("train").returncode == 2
    assert run_cli("fly").returncode == 2


def test_the_app_command_without_gradio_names_the_extra_to_install(monkeypatch, capsys):
    """gradio is the `app` extra: `lora-dpo app` without it exits 2 saying what to install; the library never
    needed it (nothing else imports the app)."""
    from lora_dpo.cli import main

    monkeypatch.setitem(sys.modules, "gradio", None)  # as if it were not installed
    assert main(["app"]) == 2
    assert "pip install 'lora-dpo[app]'" in capsys.readouterr().err


def test_a_save_to_disk_folder_trains(recipe, tmp_path):
    import datasets

    rows = [{"prompt": f"q{i}", "chosen": "good answer", "rejected": "bad"} for i in range(6)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    result = run_cli("train", recipe, f"data.train={tmp_path / 'saved'}")
    assert result.returncode == 0, result.stderr
    assert "6 rows" in result.stderr and (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()
