"""Export a finished run: its adapter, or the adapter merged into the 16-bit base; a model card; a Hub push.

    export(source, out, merge=False, dtype="bf16", ...) -> ExportResult     the local export
    push(folder, repo_id, private=False, revision=None, token=None, ...)  -> PushResult   the upload (hub.py)

This module finds what to export (a run, one of its checkpoints, or an adapter folder: run/source.py), stages
the export in a temporary sibling of the output folder, writes the tokenizer, recipe, plots and model card
(card.py) beside the weights, and moves the folder into place only when everything is written: on any failure
`out` is left as it was. The merge and its log-prob check are merge.py's; the upload is hub.py's; the command
line is cli/export.py.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..config import ModelConfig
from ..errors import UserError
from ..model.load import load_tokenizer_for
from ..run.rundir import staged_dir
from ..run.source import Source, resolve_source
from ..run.card import CARD_FILES, hub_model_id, is_hub_id, write_card
from .gguf import GGUF_BYTES, GgufCheck, check_gguf, convert, converter, gguf_name, needs
from .hub import check_repo_id, list_files
from .merge import (
    BLIND, ROUNDING, SizeEstimate, Verification, check_disk, folder_bytes, format_size, log_stderr, merge_and_verify,
    parse_device, plan_merge, verification_sequences,
)  # fmt: skip
from .tolerance import DTYPES, GGUF_TYPES, VERIFY_PAIRS


def load_source_tokenizer(src: Source):
    """The tokenizer the adapter was trained with (model/load.load_tokenizer_for)."""
    cfg = ModelConfig(name=src.base_name, revision=src.revision, gguf_file=src.gguf_file,
                      trust_remote_code=src.trust_remote_code)
    return load_tokenizer_for(src.adapter_dir, cfg)


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
    gguf: Optional[GgufCheck] = None  # the GGUF file written beside the merged model, and its check

    @property
    def max_logp_diff(self) -> Optional[float]:
        return self.verification.max_abs_diff if self.verification else None

    def summary(self) -> str:
        size = sum(n for _, n in self.files)
        what = "adapter" if self.kind == "adapter" else f"merged {self.dtype} model"
        text = f"exported the {what} to {self.out} ({len(self.files)} files, {format_size(size)})"
        if self.verification:
            text += "\nverified: " + self.verification.summary()
        if self.gguf:
            text += "\nverified: " + self.gguf.summary()
            file = self.out / self.gguf.file.name
            text += f"\nnext: llama-cli -m {file} -cnv (llama.cpp), or an Ollama Modelfile `FROM {file}`; "
            text += (f"for q4_k_m and other k-quants: llama-quantize {file} OUT.gguf q4_k_m" if self.gguf.lossless
                     else "for q4_k_m and other k-quants, export --gguf bf16 and run llama.cpp's llama-quantize on it")
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
    gguf: Optional[str] = None,
    llama_cpp: Optional[str] = None,
    log: Callable[[str], None] = log_stderr,
) -> ExportResult:
    """Export a run directory or adapter folder to `out`: the adapter (default) or, with `merge`, the adapter
    merged into the base reloaded in `dtype` ('bf16', 'fp16', 'fp32') on `device`, saved as safetensors
    shards of at most `max_shard_size` and verified against base + adapter (see TOLERANCES; `tolerance`
    replaces it by one absolute bound in nats). Both come with tokenizer files and a model card.

    base: load this base instead of the one the run names. base_id: the base's Hub id for the card and
    adapter_config.json when the base is a local folder. repo_id: the Hub id the export will be pushed to
    (for the card's usage snippets). gguf: also convert the merged model to a GGUF file of this type (GGUF_TYPES;
    implies `merge`) with llama.cpp's converter (from `llama_cpp`, a checkout, else the package index) and check
    it (export/gguf.py). Messages go to `log`. Raises UserError for anything the user can fix;
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
    if llama_cpp is not None and gguf is None:
        raise UserError("--llama-cpp: only with --gguf TYPE")
    if gguf is not None:
        if gguf not in GGUF_TYPES:
            raise UserError(f"--gguf {gguf}: expected one of {', '.join(GGUF_TYPES)} (k-quants such as q4_k_m: "
                            "llama.cpp's llama-quantize, on the bf16 file)")
        needs()
        merge = True
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
                          verify_pairs, trust_remote_code, log, gguf, llama_cpp)  # fmt: skip


def _export_adapter(src: Source, out: Path, base_id, repo: str, log) -> ExportResult:
    check_disk(out, folder_bytes(src.adapter_dir) + sum(p.stat().st_size for p in src.plots) + 2**20)
    with staged_dir(out) as tmp:
        # the card of the run's adapter (or peft's blank template in a checkpoint's) is replaced by the export's
        shutil.copytree(src.adapter_dir, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*CARD_FILES))
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


def _export_merged(src, out, base_id, repo, dtype, device, max_shard_size, tolerance, verify_pairs, trc, log,
                   gguf=None, llama_cpp=None):
    # 1. What it needs, said before anything heavy starts; refuse when the disk cannot hold it.
    estimate = plan_merge(src, out, dtype, device, max_shard_size, trc, log)
    script = None
    if gguf is not None:
        if estimate is not None:
            extra = int(estimate.params * GGUF_BYTES[gguf])
            log(f"gguf: the {gguf} file needs about {format_size(extra)} more in {out.parent}")
            check_disk(out, estimate.disk_bytes + extra)
        script = converter(llama_cpp, log)  # before the merge: a converter that cannot be had stops nothing midway

    # 2. Reference log-probs of base + adapter, merge, save; 3. reload what was written, as a user will, and compare.
    tokenizer = load_source_tokenizer(src)
    sequences, data = verification_sequences(src, tokenizer, verify_pairs, log)
    with staged_dir(out) as tmp:
        verification = merge_and_verify(tmp, src, sequences, data, dtype, device, max_shard_size, tolerance, trc, log,
                                        check_dtype=estimate.check_dtype if estimate else None)
        if not verification.passed:
            raise UserError(
                f"merge verification failed: {verification.summary()}. Nothing was written to {out}. If this is "
                f"rounding in a very deep model checked in {verification.checked_in}, rerun with a looser --tolerance "
                "(nats per token)"
            )
        if verification.blind:
            log(f"warning: {BLIND}")
        if verification.rounding_exceeds_adapter:
            log(f"warning: {ROUNDING.format(dtype=dtype)} ({verification.rounding:.2e} vs {verification.adapter_effect:.2e} nats)")
        tokenizer.save_pretrained(str(tmp))
        checked = None
        if gguf is not None:
            file = tmp / gguf_name(out, gguf)
            convert(tmp, file, gguf, script, log)
            checked = check_gguf(tmp, file, gguf, dtype, sequences, verification.saved_logps,
                                 verification.bare_logps, device, log)
            if not checked.passed:
                hint = ("" if checked.lossless else f"; {checked.gguf_type} rounding moves the log-probs more than the "
                        "adapter does: --gguf bf16 keeps the merge exactly, or train the adapter further")
                raise UserError(f"GGUF check failed: {checked.summary()}. Nothing was written to {out}{hint}")
            if checked.rounding_exceeds_adapter:
                log(f"warning: {gguf} rounding moves some log-probs more than the adapter does "
                    f"({checked.max_diff:.2e} vs {checked.adapter_max:.2e} nats); --gguf bf16 keeps the merge exactly")
        checks = verification.summary() + (f"\n\n{checked.summary()}" if checked else "")
        write_card(tmp, src, "merged", repo, base_id, checks, gguf_file=checked.file.name if checked else None)
    if checked:
        checked.file = out / checked.file.name
    return ExportResult(out=out, kind="merged", base=src.base_name, base_id=base_id, files=list_files(out),
                        dtype=dtype, estimate=estimate, verification=verification, gguf=checked)  # fmt: skip
