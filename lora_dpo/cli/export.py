"""`lora-dpo export RUN_OR_ADAPTER --out DIR [--merge] [--push-to-hub OWNER/NAME]`: the command line of
export/ (adapter or merged 16-bit model, model card, Hub push)."""

from __future__ import annotations

from ..errors import UserError
from ..export.hub import check_repo_id, push
from ..export.pipeline import export



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
    if not (args.merge or args.gguf) and any(v is not None for v in merge_only.values()):
        flags = ", ".join(f for f, v in merge_only.items() if v is not None)
        raise UserError(f"{flags}: only with --merge (the adapter alone is exported as trained)")
    result = export(
        args.source, args.out, merge=args.merge, dtype=args.dtype or "bf16", base=args.base, base_id=args.base_id,
        device=args.device or "cpu", max_shard_size=args.max_shard_size or "2GB", overwrite=args.overwrite,
        repo_id=repo_id, tolerance=args.tolerance, gguf=args.gguf, llama_cpp=args.llama_cpp,
    )  # fmt: skip
    print(result.summary())
    if repo_id:
        pushed = push(result.out, repo_id, private=args.private, revision=args.revision, dry_run=args.dry_run)
        print(pushed.listing())
    return 0
