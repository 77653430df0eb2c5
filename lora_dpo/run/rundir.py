"""The run directory: every path in it, what may be written over, atomic writes, and the record of how a run was
made. `RunDir` is the one place that spells the run directory's file names; the trainer, resume, export,
compare and the app read a run through it.

    config.yaml          the resolved recipe
    metrics.jsonl        one JSON object per logged step
    adapter/             the final adapter (peft format) with tokenizer files
    checkpoints/step-N/  everything needed to resume exactly (run/checkpoint.py)
    rounds/round-K/      iterative DPO: the policy that ended round K (the next round's reference)
    data/{train,eval}.jsonl  rows given in memory to the Python API (not an output: kept by overwrite=true)
    eval.json            final evaluation, the reference's beside it, and the run's final beta
    plots/               PNG curves (run/plots.py)
    data_report.json     what happened to the data
    run_info.json        versions, commit, device, data fingerprints, total steps
    progress.json        the run's phases so far, each with its times and progress (progress.py; run/phases.py)
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Optional

import torch
import yaml
from filelock import FileLock, Timeout

from ..errors import ConfigError

STATE_FILE = "trainer_state.json"  # written last inside a checkpoint: its presence marks a complete one
ADAPTER_DIR = "adapter"  # the adapter's folder in a run and in each of its checkpoints
_STEP_DIR = re.compile(r"^step-(\d+)$")


_HELD: dict = {}  # run directory -> the FileLock this process holds on it (RunDir.hold)


@dataclass(frozen=True)
class RunDir:
    path: Path

    CONFIG = "config.yaml"  # its presence marks a run directory (the app finds runs by it)
    # Files and folders of a run; a fresh run refuses to start over them unless overwrite=true.
    OUTPUTS = (CONFIG, "metrics.jsonl", "adapter", "eval.json", "checkpoints", "plots",
               "data_report.json", "run_info.json")

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    @classmethod
    def of(cls, run: "RunDir | str | os.PathLike") -> "RunDir":
        return run if isinstance(run, RunDir) else cls(Path(run))

    # -- the paths
    @property
    def config(self) -> Path:
        return self.path / self.CONFIG

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def adapter(self) -> Path:
        return self.path / ADAPTER_DIR

    @property
    def eval(self) -> Path:
        return self.path / "eval.json"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    @property
    def data_report(self) -> Path:
        return self.path / "data_report.json"

    @property
    def run_info(self) -> Path:
        return self.path / "run_info.json"

    @property
    def progress(self) -> Path:
        """The phases of the run so far (progress.record_to writes it, run/phases.read_phases reads it). Not one of
        OUTPUTS: a run that failed before training leaves it, and a fresh run starts it anew in place of it."""
        return self.path / "progress.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step}"

    def staging(self, step: int) -> Path:
        """The hidden folder the checkpoint of `step` is written into, then renamed to `checkpoint(step)`."""
        return self.checkpoints / f".step-{step}.tmp"

    def round(self, k: int) -> Path:
        """The adapter saved when round k ended (iterative DPO)."""
        return self.path / "rounds" / f"round-{k}"

    def data_file(self, split: str) -> Path:
        """Rows given in memory (the Python API) as the run keeps them: data/train.jsonl, data/eval.jsonl."""
        return self.path / "data" / f"{split}.jsonl"

    # -- what a run holds
    def existing_outputs(self) -> list[str]:
        return [name for name in self.OUTPUTS if (self.path / name).exists()]

    @property
    def lock_file(self) -> Path:
        return self.path / ".lock"

    def hold(self) -> None:
        """Hold the run directory for this process (a file lock in it, made if need be): a second run into the same
        output_dir is refused while this one trains. The operating system drops the lock when the process ends,
        killed or not, so a stale lock never blocks a resume. `release` lets it go."""
        key = self.path.resolve()
        if key in _HELD:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.lock_file))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise ConfigError(f"output_dir: another run is training in {self.path} (it holds {self.lock_file}); wait "
                              "for it to end, or choose another output_dir") from None
        _HELD[key] = lock

    def release(self) -> None:
        lock = _HELD.pop(self.path.resolve(), None)
        if lock is not None:
            lock.release()

    def check_writable(self) -> None:
        """Refuse an output_dir that is a file, or that cannot be written (the folder, or the nearest one that exists
        above it when it is yet to be made)."""
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"output_dir: {self.path} is a file, not a folder; choose another output_dir")
        folder = self.path
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(f"output_dir: {folder} cannot be written (permissions or a read-only file system); "
                              "choose another output_dir")

    def finished(self) -> bool:
        """The run ended: its final adapter or its final evaluation is there."""
        return (self.adapter / "adapter_config.json").is_file() or self.eval.is_file()

    def check_fresh(self, overwrite: bool) -> None:
        existing = self.existing_outputs()
        if existing and not overwrite:
            raise ConfigError(
                f"output_dir: {self.path} already holds a run ({', '.join(existing)}); choose another output_dir, "
                "continue it with resume=true, or replace it with overwrite=true"
            )

    def clear(self) -> None:
        for name in self.OUTPUTS:
            path = self.path / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    @staticmethod
    def step_of(checkpoint: Path) -> int:
        """The step a checkpoints/step-N folder was written at."""
        return int(_STEP_DIR.match(checkpoint.name).group(1))

    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.checkpoints.is_dir():
            return []
        found = []
        for child in self.checkpoints.iterdir():
            m = _STEP_DIR.match(child.name)
            if m and (child / STATE_FILE).is_file() and (child / ADAPTER_DIR).is_dir():
                found.append((int(m.group(1)), child))
        return [path for _, path in sorted(found)]

    def incomplete_checkpoints(self) -> list[Path]:
        """Folders a killed save left behind: temporary ones, or step folders missing their state file."""
        if not self.checkpoints.is_dir():
            return []
        complete = set(self.complete_checkpoints())
        return sorted(p for p in self.checkpoints.iterdir() if p.is_dir() and p not in complete)

    def read_recipe(self) -> Optional[dict]:
        """config.yaml as written (a mapping), None when it is missing; UserError-free: a broken file is None."""
        try:
            tree = yaml.safe_load(self.config.read_text())
        except (OSError, yaml.YAMLError):
            return None
        return tree if isinstance(tree, dict) else None

    def read_json(self, path: Path) -> Optional[dict]:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def final_beta(self) -> Optional[float]:
        """The beta the run ended with (adaptive beta moves it): eval.json's, else the recipe's loss.beta."""
        final = self.read_json(self.eval) or {}
        if isinstance(final.get("beta"), (int, float)):
            return float(final["beta"])
        beta = ((self.read_recipe() or {}).get("loss") or {}).get("beta")
        return float(beta) if isinstance(beta, (int, float)) else None

    # -- writing
    def write_json(self, path: Path, data: dict) -> None:
        atomic_text(path, json.dumps(data, indent=2))

    def truncate_metrics(self, step: int) -> None:
        """Drop the rows a stopped run wrote after its checkpoint at `step`, so a resumed run's rows follow on."""
        if not self.metrics.exists():
            return
        kept = []
        for line in self.metrics.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill
            if row.get("step", 0) <= step:
                kept.append(line)
        atomic_text(self.metrics, "".join(f"{line}\n" for line in kept))

    def touch_run_info(self, **updates) -> None:
        """Rewrite run_info.json with `updates` (a resumed run: its mtime tells readers the run is live again)."""
        info = self.read_json(self.run_info) if self.run_info.is_file() else {}
        self.write_json(self.run_info, {**(info or {}), **updates})


def atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def staged_dir(path: Path):
    """Yield a temporary sibling folder of `path` (same filesystem, so the final move is a rename); when the
    block ends normally it replaces `path`, with the modes of `usual_modes`; when it raises it is removed. A reader
    never sees half a folder."""
    tmp = path.with_name(f".{path.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    usual_modes(tmp)
    if path.exists():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    os.replace(tmp, path)


def usual_modes(folder: Path) -> None:
    """Give `folder` and everything in it the modes a plain mkdir and open give under this process's umask (0755
    and 0644 with umask 022; executables keep their x bits). safetensors (0.8) writes each file into a temporary
    one created 0600 and renames that into place (safetensors/safetensors#782), so without this the weights of an
    adapter or a merged model would be readable by their owner only, unlike the files beside them."""
    mask = umask()
    for item in [folder, *folder.rglob("*")]:
        if item.is_symlink():
            continue
        mode = item.stat().st_mode
        want = (0o777 if stat.S_ISDIR(mode) or mode & stat.S_IXUSR else 0o666) & ~mask
        if stat.S_IMODE(mode) != want:
            os.chmod(item, want)


def umask() -> int:
    """This process's umask. Read from /proc where there is one: os.umask reads it only by setting it, which for a
    moment would apply to files other threads create."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def run_info(device: torch.device, fingerprints: dict) -> dict:
    """Versions, project commit, hardware and data fingerprints: what it takes to reproduce the run."""
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
