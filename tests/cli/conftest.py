"""What the command-line tests share: a tiny recipe (6 pairs on the tiny Llama), written per test."""

import json

import pytest


def write_recipe(tmp_path, tiny_llama, max_steps: int):
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"q{i}", "chosen": "good answer", "rejected": "bad"})
                              for i in range(6)))
    path = tmp_path / "r.yaml"
    path.write_text(f"output_dir: {tmp_path / 'run'}\nmodel:\n  name: {tiny_llama}\ndata:\n  train: {data}\n"
                    f"  max_length: 24\n  eval_fraction: 0.3\ntrain:\n  max_steps: {max_steps}\n  batch_size: 2\n")
    return path


@pytest.fixture
def recipe(tmp_path, tiny_llama):
    """A recipe that trains 2 steps."""
    return write_recipe(tmp_path, tiny_llama, 2)


@pytest.fixture
def long_recipe(tmp_path, tiny_llama):
    """A recipe long enough (200 steps) to be stopped while it runs."""
    return write_recipe(tmp_path, tiny_llama, 200)
