"""The Python API (lora_dpo/__init__.py, api.py): the README's notebook snippet runs as written; a recipe built
in Python is checked as one read from YAML; rows in memory train as a file would."""

import json
import os
import re
import subprocess
import sys
from dataclasses import replace

import datasets
import pytest

import lora_dpo
from lora_dpo.errors import ConfigError, DataError
from tiny import REPO


def readme_snippet() -> str:
    """The first python code block under the README's "From Python" heading."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## From Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_snippet_runs_as_written(tmp_path, monkeypatch):
    (tmp_path / "recipes").symlink_to(REPO / "recipes")  # the snippet names recipes/ relative to a clone
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(readme_snippet(), "README.md", "exec"), scope)
    result = scope["result"]
    assert result.run.adapter.is_dir() and result.run.data_file("train").is_file()
    assert "rewards/accuracies" in result.metrics and "baseline" in result.metrics
    assert result.recipe.data.train == str(result.run.data_file("train").resolve())  # what config.yaml records
    assert lora_dpo.load_recipe(result.run.config) == result.recipe


def test_a_recipe_built_in_python_is_checked_as_yaml_is():
    with pytest.raises(ConfigError) as built:
        lora_dpo.TrainConfig(lr=-1)
    with pytest.raises(ConfigError) as read:
        lora_dpo.load_recipe(None, ["output_dir=x", "model.name=toy", "data.train=toy", "train.lr=-1"])
    assert str(built.value) == str(read.value) == "train.lr: must be > 0, got -1.0"
    with pytest.raises(ConfigError, match="^train.batch_size: expected an integer, got 'two'$"):
        lora_dpo.TrainConfig(batch_size="two")
    with pytest.raises(ConfigError, match="^loss.target_kl: loss.name=simpo has no reference model"):
        lora_dpo.Recipe(output_dir="x", model=lora_dpo.ModelConfig(name="toy"), data=lora_dpo.DataConfig(train="toy"),
                        loss=lora_dpo.LossConfig(name="simpo", target_kl=0.1))


def test_a_dataset_in_memory_trains_and_a_resume_must_bring_the_same_rows(tmp_path, tiny_qwen2):
    rows = [{"prompt": f"question {i} : is it good ?", "chosen": f"yes it is good {i % 3}",
             "rejected": f"no it is bad {i % 5}"} for i in range(12)]
    recipe = lora_dpo.load_recipe(None, [f"output_dir={tmp_path / 'run'}", f"model.name={tiny_qwen2}",
                                         "data.train=unused", "data.max_length=32", "lora.r=4", "train.max_steps=2",
                                         "train.batch_size=2", "eval.num_prompts=0", "train.reference_cache=null"])
    result = lora_dpo.train(recipe, data=datasets.Dataset.from_list(rows), eval_data=rows[:4])
    assert result.metrics["pairs"] == 4 and result.metrics["step"] == 2
    assert [json.loads(line) for line in (tmp_path / "run" / "data" / "train.jsonl").open()] == rows
    resumed = lora_dpo.train(replace(recipe, resume=True), data=rows, eval_data=rows[:4])
    assert resumed.metrics["step"] == 2
    with pytest.raises(ConfigError, match="^resume: the rows given as data differ from those the run started with"):
        lora_dpo.train(replace(recipe, resume=True), data=rows[::-1])
    with pytest.raises(DataError, match="^data: expected a datasets.Dataset or a list of dicts, got str$"):
        lora_dpo.train(replace(recipe, overwrite=True), data="rows.jsonl")


def test_importing_lora_dpo_loads_neither_torch_nor_gradio():
    code = "import lora_dpo, sys; print(sorted(m for m in ('torch', 'gradio', 'lora_dpo_app') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ}, check=True)
    assert out.stdout.strip() == "[]"
