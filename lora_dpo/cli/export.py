"""`lora-dpo export RUN_OR_ADAPTER --out DIR [--merge] [--push-to-hub OWNER/NAME]`: the command line of
export/ (adapter or merged 16-bit model, model card, Hub push)."""

from __future__ import annotations

import argparse

from ..errors import UserError
from ..export.hub import check_repo_id, push
from ..export.merge import DTYPES, TOLERANCES
from ..export.pipeline import export

EXAMPLES = """examples:
  lora-dpo export runs/toy --out exports/toy-adapter
  lora-dpo export runs/qwen --out exports/qwen-merged --merge --dtype bf16
  lora-dpo export runs/qwen --out exports/qwen-adapter --push-to-hub alice/qwen-dpo --private --dry-run

The Hub token comes from HF_TOKEN or `hf auth login`; it is never printed.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `lora-dpo export` on an argparse subparsers object."""
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
    p.set_defaults(run=run)
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
