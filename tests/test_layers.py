"""The package's structure holds: every module imports on its own (nothing works only because something else
was imported first), and imports inside functions are only of the optional heavy dependencies, marked. The layers,
the forbidden imports and the absence of cycles are pyproject.toml's import-linter contracts, which `make test`
checks with lint-imports before these tests (with ruff's PLC0415 for imports outside the top level)."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tiny import REPO

PACKAGES = {"lora_dpo": REPO / "lora_dpo", "lora_dpo_app": REPO / "app"}
OPTIONAL_HEAVY = {"bitsandbytes", "deepspeed", "gradio", "tensorboard", "wandb", "playwright", "gguf"}
# third-party packages the fresh interpreter loads first, so that each child below spends its time on lora-dpo
THIRD_PARTY = ("torch", "transformers", "peft", "accelerate", "datasets", "safetensors", "huggingface_hub",
               "matplotlib.figure", "gradio", "pandas", "yaml", "tqdm")


def modules() -> list[str]:
    out = []
    for package, root in PACKAGES.items():
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__main__":
                continue
            out.append(".".join((package, *parts[:-1])) if parts[-1] == "__init__" else ".".join((package, *parts)))
    return out


# A fresh interpreter imports the third-party packages once, then forks one child per module: each child starts
# with no module of lora-dpo loaded and imports one.
FORKED_IMPORTS = """
import importlib, os, sys, traceback
for name in sys.argv[2].split(","):
    importlib.import_module(name)
failed = []
for module in sys.argv[1].split(","):
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(module)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1] != 0:
        failed.append(module)
print("FAILED:" + ",".join(failed))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_every_module_imports_on_its_own_in_a_fresh_interpreter():
    names = modules()
    assert len(names) > 50 and "lora_dpo.training.loop" in names and "lora_dpo_app.main" in names
    out = subprocess.run([sys.executable, "-c", FORKED_IMPORTS, ",".join(names), ",".join(THIRD_PARTY)],
                         capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.stdout.strip() == "FAILED:", out.stdout + out.stderr[-3000:]


MARKED = re.compile(r"#\s*noqa:[^#]*PLC0415")  # ruff's rule, silenced on the line, with the reason after it


def function_level_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import statement inside a function or method of a file."""
    tree, found = ast.parse(path.read_text()), []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import):
                    found += [(inner.lineno, alias.name) for alias in inner.names]
                elif isinstance(inner, ast.ImportFrom):
                    found.append((inner.lineno, "." * inner.level + (inner.module or "")))
    return found


def test_imports_inside_functions_are_only_of_optional_heavy_dependencies():
    offenders = []
    for package, root in PACKAGES.items():
        for path in sorted(root.rglob("*.py")):
            lines = path.read_text().splitlines()
            for lineno, module in function_level_imports(path):
                top = module.lstrip(".").split(".")[0]
                # the app's gradio-bound modules (tabs) are the `app` extra too: imported when the app is built
                optional = top in OPTIONAL_HEAVY or (package == "lora_dpo_app" and module.startswith("."))
                if not optional or not MARKED.search(lines[lineno - 1]):
                    offenders.append(f"{path.relative_to(REPO)}:{lineno} imports {module}")
    assert offenders == []


def test_no_function_is_longer_than_a_screen():
    """A function reads at once (about 100 lines at most); the loop's longest phase included."""
    long = []
    for path in sorted(PACKAGES["lora_dpo"].rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 100:
                long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1}")
    assert long == []
