"""The run directory: what may be written over, atomic writes, and the record of how a run was made."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from .errors import ConfigError

# Files and folders of a run; a fresh run refuses to start over them unless overwrite=true.
RUN_OUTPUTS = ("config.yaml", "metrics.jsonl", "adapter", "eval.json", "checkpoints", "plots",
               "data_report.json", "run_info.json")


def check_fresh(out: Path, overwrite: bool) -> None:
    existing = [name for name in RUN_OUTPUTS if (out / name).exists()]
    if existing and not overwrite:
        raise ConfigError(
            f"output_dir: {out} already holds a run ({', '.join(existing)}); choose another output_dir, "
            "continue it with resume=true, or replace it with overwrite=true"
        )


def clear(out: Path) -> None:
    for name in RUN_OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def staged_dir(path: Path):
    """Yield a temporary sibling folder of `path` (same filesystem, so the final move is a rename); when the
    block ends normally it replaces `path`, when it raises it is removed. A reader never sees half a folder."""
    tmp = path.with_name(f".{path.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    os.replace(tmp, path)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the rows a stopped run wrote after its checkpoint at `step`, so a resumed run's rows follow on."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill
        if row.get("step", 0) <= step:
            kept.append(line)
    atomic_text(path, "".join(f"{line}\n" for line in kept))


def data_fingerprint(items, tokenizer_name: str) -> str:
    """sha256 of the tokenised examples (pairs, or single completions with their labels) and the tokenizer:
    equal fingerprints, equal training data."""
    h = hashlib.sha256(tokenizer_name.encode())
    for p in items:
        if hasattr(p, "chosen_ids"):
            h.update(json.dumps([p.index, p.prompt_ids, p.chosen_ids, p.rejected_ids]).encode())
        else:
            h.update(json.dumps([p.index, p.prompt_ids, p.completion_ids, p.desirable]).encode())
    return h.hexdigest()


def run_info(device: torch.device, fingerprints: dict) -> dict:
    """Versions, project commit, hardware and data fingerprints: what it takes to reproduce the run."""
    from importlib.metadata import PackageNotFoundError, version

    packages = {}
    for name in ("lora-dpo", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets"):
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    info = {"python": sys.version.split()[0], "platform": platform.platform(), "packages": packages,
            "git_commit": _git_commit(), "device": str(device), "data": fingerprints}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = {"name": props.name, "memory_gb": round(props.total_memory / 1e9, 2),
                       "cuda": torch.version.cuda}
    return info


def touch_run_info(out: Path, **updates) -> None:
    """Rewrite run_info.json with `updates` (a resumed run: its mtime tells readers the run is live again)."""
    path = out / "run_info.json"
    try:
        info = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        info = {}
    atomic_text(path, json.dumps({**info, **updates}, indent=2))


def _git_commit() -> str | None:
    """The commit of the lora-dpo checkout this code runs from, when it runs from one."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=5).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")
