"""Export a finished run: its adapter, or the adapter merged into the 16-bit base; a model card; a Hub push.

    export(source, out, merge=False, dtype="bf16", ...) -> ExportResult     the local export
    push(folder, repo_id, private=False, revision=None, token=None, ...)  -> PushResult   the upload (hub.py)

This module finds what to export (a run, one of its checkpoints, or an adapter folder), stages the export in a
temporary sibling of the output folder, writes the tokenizer, recipe, plots and model card (modelcard.py)
beside the weights, and moves the folder into place only when everything is written: on any failure `out`
is left as it was. The merge and its log-prob check are merge.py's; the upload is hub.py's.
`lora-dpo export` (add_parser, run) is at the end.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from .errors import UserError, first_line
from .hub import check_repo_id, list_files, push
from .merge import (
    BLIND, DTYPES, TOLERANCES, VERIFY_PAIRS, SizeEstimate, Verification, check_disk, folder_bytes,
    format_size, log_stderr, merge_and_verify, parse_device, plan_merge, verification_sequences,
)  # fmt: skip
from .modelcard import hub_model_id, is_hub_id, write_card
from .rundir import staged_dir


# ---------------------------------------------------------------------------------------------- the source


@dataclass
class Source:
    """What is exported: an adapter folder, and the run it came from when there is one."""

    adapter_dir: Path
    run_dir: Optional[Path]
    recipe: Optional[dict]  # the run's config.yaml as written
    final: Optional[dict]  # the run's eval.json
    base_name: str  # the base as the recipe, adapter_config.json or --base names it ('toy' stays 'toy')
    revision: Optional[str]
    trust_remote_code: bool
    plots: list[Path] = field(default_factory=list)

    def base_path(self) -> str:
        """The base as `from_pretrained` takes it (builds the offline toy model on first use)."""
        from .model import resolve_model_name

        return resolve_model_name(self.base_name)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot be read: {first_line(exc)}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def resolve_source(source: str | os.PathLike, base: Optional[str] = None) -> Source:
    """A run directory (adapter/ and config.yaml), one of its checkpoints/step-N, or an adapter folder
    (adapter_config.json). The base is `base` when given, else the run's `model.name`/`model.revision`, else
    adapter_config.json's `base_model_name_or_path`."""
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"{source}: no such run directory or adapter folder")
    if not path.is_dir():
        raise UserError(f"{source}: is a file; expected a run directory or an adapter folder")
    final_adapter = True
    if (path / "adapter_config.json").is_file():
        adapter_dir = path
        run_dir = path.parent if path.name == "adapter" and (path.parent / "config.yaml").is_file() else None
    elif (path / "adapter" / "adapter_config.json").is_file() and path.parent.name == "checkpoints":
        # checkpoints/step-N of a run: its adapter, the run's recipe, but not the run's final eval.json
        adapter_dir, final_adapter = path / "adapter", False
        run_dir = path.parent.parent if (path.parent.parent / "config.yaml").is_file() else None
    elif (path / "config.yaml").is_file():
        if not (path / "adapter" / "adapter_config.json").is_file():
            raise UserError(
                f"{source}: a run directory without a finished adapter (no adapter/adapter_config.json); "
                "the run may still be training, or it stopped before saving one"
            )
        adapter_dir, run_dir = path / "adapter", path
    else:
        raise UserError(
            f"{source}: neither a run directory (with adapter/ and config.yaml) nor an adapter folder "
            "(with adapter_config.json)"
        )
    recipe = final = None
    if run_dir is not None:
        try:
            recipe = yaml.safe_load((run_dir / "config.yaml").read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise UserError(f"{run_dir / 'config.yaml'}: cannot be read: {first_line(exc)}") from None
        recipe = recipe if isinstance(recipe, dict) else None
        if final_adapter and (run_dir / "eval.json").is_file():
            final = _read_json(run_dir / "eval.json")
    model = (recipe or {}).get("model") or {}
    adapter_cfg = _read_json(adapter_dir / "adapter_config.json")
    if base:
        name, revision = base, None
    elif isinstance(model.get("name"), str):
        name, revision = model["name"], model.get("revision")
    elif isinstance(adapter_cfg.get("base_model_name_or_path"), str):
        name, revision = adapter_cfg["base_model_name_or_path"], adapter_cfg.get("revision")
    else:
        raise UserError(f"{source}: cannot tell which base model the adapter belongs to; pass --base")
    plots = sorted((run_dir / "plots").glob("*.png")) if run_dir is not None and final_adapter else []
    return Source(adapter_dir, run_dir, recipe, final, name, revision, bool(model.get("trust_remote_code")), plots)


def load_source_tokenizer(src: Source):
    """The tokenizer the adapter was trained with: saved beside it by the trainer, or else (a checkpoint, a
    bare peft adapter) the base's, prepared as the trainer prepares it."""
    if (src.adapter_dir / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(src.adapter_dir))
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot load the tokenizer in {src.adapter_dir}: {first_line(exc)}") from None
        if tok.pad_token_id is None and tok.eos_token_id is not None:
            tok.pad_token = tok.eos_token
        return tok
    from .config import ModelConfig
    from .model import load_tokenizer

    cfg = ModelConfig(name=src.base_name, revision=src.revision, trust_remote_code=src.trust_remote_code)
    return load_tokenizer(cfg)


# ----------------------------------------------------------------------------------------------- the export


@dataclass
class ExportResult:
    out: Path
    kind: str  # 'adapter' or 'merged'
    base: str  # the base as named by the run, the adapter or --base
    base_id: Optional[str]  # its Hub id, None for a local folder
    files: list[tuple[str, int]]  # (relative path, bytes)
    dtype: Optional[str] = None  # merged only
    estimate: Optional[SizeEstimate] = None  # merged only
    verification: Optional[Verification] = None  # merged only

    @property
    def max_logp_diff(self) -> Optional[float]:
        return self.verification.max_abs_diff if self.verification else None

    def summary(self) -> str:
        size = sum(n for _, n in self.files)
        what = "adapter" if self.kind == "adapter" else f"merged {self.dtype} model"
        text = f"exported the {what} to {self.out} ({len(self.files)} files, {format_size(size)})"
        if self.verification:
            text += "\nverified: " + self.verification.summary()
        return text


def _check_out(out: Path, src: Source, overwrite: bool) -> None:
    target = out.expanduser().absolute().resolve()
    for protected in filter(None, (src.adapter_dir, src.run_dir)):
        p = protected.absolute().resolve()
        if target == p or target in p.parents:
            raise UserError(f"--out {out}: would replace the source {protected}; choose another folder")
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise UserError(f"--out {out}: already exists; choose another folder or pass --overwrite")


def export(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    merge: bool = False,
    dtype: str = "bf16",
    base: Optional[str] = None,
    base_id: Optional[str] = None,
    device: str = "cpu",
    max_shard_size: str = "2GB",
    overwrite: bool = False,
    repo_id: Optional[str] = None,
    tolerance: Optional[float] = None,
    verify_pairs: int = VERIFY_PAIRS,
    trust_remote_code: Optional[bool] = None,
    log: Callable[[str], None] = log_stderr,
) -> ExportResult:
    """Export a run directory or adapter folder to `out`: the adapter (default) or, with `merge`, the adapter
    merged into the base reloaded in `dtype` ('bf16', 'fp16', 'fp32') on `device`, saved as safetensors
    shards of at most `max_shard_size` and verified against base + adapter (see TOLERANCES; `tolerance`
    replaces it by one absolute bound in nats). Both come with tokenizer files and a model card.

    base: load this base instead of the one the run names. base_id: the base's Hub id for the card and
    adapter_config.json when the base is a local folder. repo_id: the Hub id the export will be pushed to
    (for the card's usage snippets). Messages go to `log`. Raises UserError for anything the user can fix;
    on any failure `out` is left as it was.
    """
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    if base_id is not None and not is_hub_id(base_id):
        raise UserError(f"--base-id {base_id}: not a Hugging Face model id (OWNER/NAME)")
    if verify_pairs < 1:
        raise UserError(f"verify_pairs: must be >= 1, got {verify_pairs}")
    if repo_id is not None:
        check_repo_id(repo_id)
    src = resolve_source(source, base)
    out = Path(out).expanduser()
    _check_out(out, src, overwrite)
    base_id = base_id or hub_model_id(src.base_name)
    repo = repo_id or str(out)
    if trust_remote_code is None:
        trust_remote_code = src.trust_remote_code
    if not merge:
        return _export_adapter(src, out, base_id, repo, log)
    return _export_merged(src, out, base_id, repo, dtype, parse_device(device), max_shard_size, tolerance,
                          verify_pairs, trust_remote_code, log)  # fmt: skip


def _export_adapter(src: Source, out: Path, base_id, repo: str, log) -> ExportResult:
    check_disk(out, folder_bytes(src.adapter_dir) + sum(p.stat().st_size for p in src.plots) + 2**20)
    with staged_dir(out) as tmp:
        # peft's own README.md is a blank template: ours replaces it
        shutil.copytree(src.adapter_dir, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("README.md"))
        if not (tmp / "tokenizer_config.json").is_file():  # a checkpoint's adapter: the base's tokenizer
            load_source_tokenizer(src).save_pretrained(str(tmp))
        cfg = json.loads((tmp / "adapter_config.json").read_text())
        if base_id or Path(src.base_name).expanduser().is_dir():
            # others load the adapter by this name: a Hub id when known, else the base as given
            cfg["base_model_name_or_path"] = base_id or src.base_name
            cfg["revision"] = src.revision
            (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        write_card(tmp, src, "adapter", repo, base_id)
    if base_id is None:
        log(f"notice: the base '{src.base_name}' is a local folder, so the card names no base_model; "
            "pass --base-id OWNER/NAME to name its Hub id")
    return ExportResult(out=out, kind="adapter", base=src.base_name, base_id=base_id, files=list_files(out))


def _export_merged(src, out, base_id, repo, dtype, device, max_shard_size, tolerance, verify_pairs, trc, log):
    # 1. What it needs, said before anything heavy starts; refuse when the disk cannot hold it.
    estimate = plan_merge(src, out, dtype, device, max_shard_size, trc, log)

    # 2. Reference log-probs of base + adapter, merge, save; 3. reload what was written, as a user will, and compare.
    tokenizer = load_source_tokenizer(src)
    sequences, data = verification_sequences(src, tokenizer, verify_pairs, log)
    with staged_dir(out) as tmp:
        verification = merge_and_verify(tmp, src, sequences, data, dtype, device, max_shard_size, tolerance, trc, log)
        if not verification.passed:
            raise UserError(
                f"merge verification failed: {verification.summary()}. Nothing was written to {out}. If this is "
                "rounding in a very deep model, rerun with a looser --tolerance (nats per token)"
            )
        if verification.blind:
            log(f"warning: {BLIND}")
        tokenizer.save_pretrained(str(tmp))
        write_card(tmp, src, "merged", repo, base_id, verification.summary())
    return ExportResult(out=out, kind="merged", base=src.base_name, base_id=base_id, files=list_files(out),
                        dtype=dtype, estimate=estimate, verification=verification)  # fmt: skip


# --------------------------------------------------------------------------------------------------- the CLI

EXAMPLES = """examples:
  lora-dpo export runs/toy --out exports/toy-adapter
  lora-dpo export runs/qwen --out exports/qwen-merged --merge --dtype bf16
  lora-dpo export runs/qwen --out exports/qwen-adapter --push-to-hub alice/qwen-dpo --private --dry-run

The Hub token comes from HF_TOKEN or `hf auth login`; it is never printed.
"""


def add_parser(subparsers) -> Any:
    """Register `lora-dpo export` on an argparse subparsers object."""
    import argparse

    p = subparsers.add_parser(
        "export",
        help="export a run's adapter, or a merged 16-bit model, with a model card; push it to the Hub",
        description="Export a run's LoRA adapter (default) or the adapter merged into the 16-bit base, with "
        "tokenizer files and a model card; optionally push the export to the Hugging Face Hub.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", metavar="RUN_OR_ADAPTER",
                   help="a run directory (adapter/ + config.yaml), one of its checkpoints/step-N, or an adapter folder")
    p.add_argument("--out", required=True, metavar="DIR", help="the export folder (must not exist, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--base", help="base model to use instead of the one the run or adapter names (Hub id or folder)")
    p.add_argument("--base-id", metavar="OWNER/NAME", help="Hub id of a base given as a local folder, for the card")
    m = p.add_argument_group("merge")
    m.add_argument("--merge", action="store_true",
                   help="merge the adapter into the base reloaded in bf16, fp16 or fp32 (never 4-bit)")
    m.add_argument("--dtype", choices=list(DTYPES), help="dtype of the merged weights (default bf16)")
    m.add_argument("--device", help="where the merge runs (default cpu: no GPU memory needed)")
    m.add_argument("--max-shard-size", metavar="SIZE", help="largest safetensors shard, e.g. 2GB (default)")
    defaults = ", ".join(f"{k} {a:g} + {r:g}·|log p|" for k, (a, r) in TOLERANCES.items())
    m.add_argument("--tolerance", type=float, metavar="NATS", help="bound on the per-token log-prob difference "
                   f"between merged and base + adapter (default by dtype: {defaults})")  # fmt: skip
    h = p.add_argument_group("Hugging Face Hub")
    h.add_argument("--push-to-hub", metavar="OWNER/NAME", help="upload the export to this model repository")
    h.add_argument("--private", action="store_true", help="create the repository private")
    h.add_argument("--revision", metavar="BRANCH", help="upload to this branch (created if missing)")
    h.add_argument("--dry-run", action="store_true", help="export, list what would be uploaded, upload nothing")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    """`lora-dpo export`: returns 0; raises UserError (exit 2 in the CLI) for anything the user can fix."""
    repo_id = check_repo_id(args.push_to_hub) if args.push_to_hub else None
    if not repo_id:
        hub_only = (("--private", args.private), ("--revision", args.revision), ("--dry-run", args.dry_run))
        given = [flag for flag, value in hub_only if value]
        if given:
            raise UserError(f"{', '.join(given)}: only with --push-to-hub OWNER/NAME")
    merge_only = {"--dtype": args.dtype, "--device": args.device, "--max-shard-size": args.max_shard_size,
                  "--tolerance": args.tolerance}  # fmt: skip
    if not args.merge and any(v is not None for v in merge_only.values()):
        flags = ", ".join(f for f, v in merge_only.items() if v is not None)
        raise UserError(f"{flags}: only with --merge (the adapter alone is exported as trained)")
    result = export(
        args.source, args.out, merge=args.merge, dtype=args.dtype or "bf16", base=args.base, base_id=args.base_id,
        device=args.device or "cpu", max_shard_size=args.max_shard_size or "2GB", overwrite=args.overwrite,
        repo_id=repo_id, tolerance=args.tolerance,
    )  # fmt: skip
    print(result.summary())
    if repo_id:
        pushed = push(result.out, repo_id, private=args.private, revision=args.revision, dry_run=args.dry_run)
        print(pushed.listing())
    return 0
