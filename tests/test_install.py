"""lora-dpo as a user installs it: a wheel built from this repository, in a fresh virtual environment outside
the clone, carries its recipes and the toy base, so `lora-dpo recipes` and `lora-dpo train toy` work from any
folder. The command line answers --help without importing torch."""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(argv, cwd, **env):
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env={**os.environ, **env}, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv holding only the wheel; the dependencies come from this interpreter's site-packages through a
    .pth line (the network is not needed, and the editable install's finder is not loaded there)."""
    root = tmp_path_factory.mktemp("install")
    source = root / "source"  # a copy: setuptools would reuse the clone's stale build/ folder
    shutil.copytree(REPO, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "runs", ".cache", "*.egg-info", "__pycache__", ".pytest_cache"))
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", root / "dist", source],
        cwd=root)
    wheel = next((root / "dist").glob("lora_dpo-*.whl"))
    run([sys.executable, "-m", "venv", "--without-pip", root / "venv"], cwd=root)
    python = root / "venv" / "bin" / "python"
    purelib = run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=root).strip()
    Path(purelib, "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel], cwd=root)
    return root / "venv" / "bin", root


def test_the_wheel_holds_every_module_recipe_and_toy_base_file(installed):
    _, root = installed
    with zipfile.ZipFile(next((root / "dist").glob("*.whl"))) as wheel:
        inside = {name for name in wheel.namelist() if ".dist-info/" not in name}
    clone = {f"lora_dpo/{p.relative_to(REPO / 'lora_dpo')}" for p in (REPO / "lora_dpo").rglob("*.py")}
    clone |= {f"lora_dpo_app/{p.relative_to(REPO / 'app')}" for p in (REPO / "app").rglob("*.py")}
    clone |= {f"lora_dpo/recipes/{p.relative_to(REPO / 'recipes')}" for p in (REPO / "recipes").rglob("*.yaml")}
    clone |= {f"lora_dpo/toy/base/{p.name}" for p in (REPO / "lora_dpo" / "toy" / "base").iterdir()}
    assert clone - inside == set()  # a subpackage missing from pyproject's packages would be missing here


def test_the_installed_package_is_the_wheel_not_the_clone(installed):
    bin_dir, root = installed
    where = run([bin_dir / "python", "-c", "import lora_dpo, lora_dpo_app; print(lora_dpo.__file__)"], cwd=root)
    assert Path(where.strip()).is_relative_to(root / "venv")


def test_the_installed_cli_lists_the_shipped_recipes_from_any_folder(installed):
    bin_dir, root = installed
    listing = run([bin_dir / "lora-dpo", "recipes"], cwd=root)
    names = [line.split()[0] for line in listing.splitlines() if line[:1].strip()]
    assert names[0] == "toy" and {"toy-kto", "qwen2.5-1.5b-8gb", "llama3.1-8b-16gb"} <= set(names), listing
    assert "gpu: 8 GB" in listing and "lora-dpo train toy" in listing


def test_the_installed_cli_trains_a_shipped_recipe_by_name(installed, tmp_path):
    bin_dir, _ = installed
    run([bin_dir / "lora-dpo", "train", "toy", "train.max_steps=2", "eval.num_prompts=8"], cwd=tmp_path)
    assert (tmp_path / "runs" / "toy" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "runs" / "toy" / "eval.json").is_file()


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["data", "--help"], ["export", "--help"],
                                  ["compare", "--help"], ["plan", "--help"], ["app", "--help"], ["recipes"]])
def test_help_and_the_recipe_list_import_neither_torch_nor_gradio(argv, tmp_path):
    probe = ("import sys, runpy; sys.argv = ['lora-dpo', *sys.argv[1:]]\n"
             "try:\n    from lora_dpo.cli.main import main; code = main()\n"
             "except SystemExit as exit: code = exit.code\n"
             "heavy = sorted(m for m in ('torch', 'gradio', 'datasets', 'transformers') if m in sys.modules)\n"
             "print('HEAVY', heavy); sys.exit(code)")
    out = run([sys.executable, "-c", probe, *argv], cwd=tmp_path)
    assert out.rstrip().endswith("HEAVY []"), out[-500:]
