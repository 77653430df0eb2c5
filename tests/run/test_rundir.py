"""What the run directory's writers leave on disk (run/rundir.py): a staged folder (a run's adapter, an export) gets
the modes a plain mkdir and open give under the umask, although safetensors creates its files 0600."""

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lora_dpo.config import load_recipe
from lora_dpo.export.pipeline import export
from lora_dpo.run.rundir import staged_dir
from lora_dpo.training.loop import train


@pytest.fixture
def umask():
    """Set the process's umask for a test, and put the old one back."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def modes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_a_staged_folder_gets_the_usual_modes_under_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    out = tmp_path / "export"
    with staged_dir(out) as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp / "adapter_model.safetensors"))
        assert stat.S_IMODE((tmp / "adapter_model.safetensors").stat().st_mode) == 0o600  # safetensors' own
        (tmp / "plots").mkdir()
        (tmp / "plots" / "loss.png").write_bytes(b"png")
        (tmp / "adapter_config.json").write_text("{}")
    assert modes(out) == {".": dir_mode, "adapter_model.safetensors": file_mode, "plots": dir_mode,
                          "plots/loss.png": file_mode, "adapter_config.json": file_mode}


def test_a_trained_adapter_and_its_export_are_readable_by_others(tmp_path, tiny_llama, umask):
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"q{i}", "chosen": "good answer", "rejected": "bad"})
                              for i in range(8)))
    train(load_recipe(None, [f"output_dir={tmp_path / 'run'}", f"model.name={tiny_llama}", f"data.train={data}",
                             "data.max_length=24", "data.eval_fraction=0.25", "train.max_steps=1",
                             "train.batch_size=2", "eval.batch_size=2"]))
    export(tmp_path / "run", tmp_path / "export")
    for folder in (tmp_path / "run" / "adapter", tmp_path / "export"):
        found = modes(folder)
        assert "adapter_model.safetensors" in found
        wrong = {name: oct(mode) for name, mode in found.items()
                 if mode != (0o755 if (folder / name).is_dir() else 0o644)}
        assert not wrong, (folder, wrong)
