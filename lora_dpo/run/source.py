"""What a finished run hands on (to export, compare and the app): an adapter folder, and the run it came from
when there is one, read through `RunDir`."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from ..errors import UserError, first_line
from .rundir import ADAPTER_DIR, STATE_FILE, RunDir


@dataclass
class Source:
    """What is exported or compared: an adapter folder, and the run it came from when there is one."""

    adapter_dir: Path
    run_dir: Optional[Path]
    recipe: Optional[dict]  # the run's config.yaml as written
    final: Optional[dict]  # the run's eval.json
    base_name: str  # the base as the recipe, adapter_config.json or --base names it ('toy' stays 'toy')
    revision: Optional[str]
    trust_remote_code: bool
    plots: list[Path] = field(default_factory=list)
    beta: Optional[float] = None  # the beta the adapter was trained to (the final one under adaptive beta)
    gguf_file: Optional[str] = None  # the run's model.gguf_file: the base is that GGUF file in base_name
    base_origin: Optional[dict] = None  # run_info.json's: the GGUF file the trained base was dequantised from


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot be read: {first_line(exc)}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def _locate(path: Path, source) -> tuple[Path, Optional[RunDir], Optional[Path]]:
    """(adapter folder, its run, the checkpoint it is) of a run directory, one of its checkpoints/step-N, or
    an adapter folder."""
    if (path / "adapter_config.json").is_file():
        run = RunDir(path.parent)
        return path, run if path.name == ADAPTER_DIR and run.config.is_file() else None, None
    if (path / ADAPTER_DIR / "adapter_config.json").is_file() and path.parent.name == RunDir(path).checkpoints.name:
        # checkpoints/step-N of a run: its adapter, the run's recipe, but not the run's final eval.json
        run = RunDir(path.parent.parent)
        return path / ADAPTER_DIR, run if run.config.is_file() else None, path
    run = RunDir(path)
    if run.config.is_file():
        if not (run.adapter / "adapter_config.json").is_file():
            raise UserError(
                f"{source}: a run directory without a finished adapter (no adapter/adapter_config.json); "
                "the run may still be training, or it stopped before saving one"
            )
        return run.adapter, run, None
    raise UserError(
        f"{source}: neither a run directory (with adapter/ and config.yaml) nor an adapter folder "
        "(with adapter_config.json)"
    )


def resolve_source(source: str | os.PathLike, base: Optional[str] = None) -> Source:
    """A run directory (adapter/ and config.yaml), one of its checkpoints/step-N, or an adapter folder
    (adapter_config.json). The base is `base` when given, else the run's `model.name`/`model.revision`, else
    adapter_config.json's `base_model_name_or_path`."""
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"{source}: no such run directory or adapter folder")
    if not path.is_dir():
        raise UserError(f"{source}: is a file; expected a run directory or an adapter folder")
    adapter_dir, run, checkpoint = _locate(path, source)
    recipe = final = None
    beta = base_origin = None
    if run is not None:
        try:
            recipe = yaml.safe_load(run.config.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise UserError(f"{run.config}: cannot be read: {first_line(exc)}") from None
        recipe = recipe if isinstance(recipe, dict) else None
        if checkpoint is None and run.eval.is_file():
            final = _read_json(run.eval)
        beta = run.final_beta()
        if run.run_info.is_file():
            base_origin = _read_json(run.run_info).get("base_origin")
        if checkpoint is not None:  # the beta of that step (adaptive beta moves it)
            state = _read_json(checkpoint / STATE_FILE)
            beta = float(state["beta"]) if isinstance(state.get("beta"), (int, float)) else beta
    model = (recipe or {}).get("model") or {}
    adapter_cfg = _read_json(adapter_dir / "adapter_config.json")
    gguf_file = None
    if base:
        name, revision = base, None
    elif isinstance(model.get("name"), str):
        name, revision, gguf_file = model["name"], model.get("revision"), model.get("gguf_file")
    elif isinstance(adapter_cfg.get("base_model_name_or_path"), str):
        name, revision = adapter_cfg["base_model_name_or_path"], adapter_cfg.get("revision")
    else:
        raise UserError(f"{source}: cannot tell which base model the adapter belongs to; pass --base")
    plots = sorted(run.plots.glob("*.png")) if run is not None and checkpoint is None else []
    return Source(adapter_dir, run.path if run else None, recipe, final, name, revision,
                  bool(model.get("trust_remote_code")), plots, beta, gguf_file,
                  base_origin if isinstance(base_origin, dict) and not base else None)
