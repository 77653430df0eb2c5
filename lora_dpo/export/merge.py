"""Merge a LoRA adapter into its base reloaded in 16 or 32 bits, and prove the merge by its log-probs.

    plan_merge(src, out, dtype, device, ...)              -> SizeEstimate | None   refuse early, say what it needs
    merge_and_verify(folder, src, sequences, data, ...)   -> Verification          merge, save, reload, compare

A merge never touches 4-bit weights: the base is reloaded in bf16/fp16/fp32 (on the CPU by default, so an 8 GB
GPU is no limit), the adapter is merged with peft's `merge_and_unload`, and the result is saved as sharded
safetensors. What was written is reloaded and its log-probs are compared with base + adapter; `pipeline.py`
moves the folder into place only when they match, so a folder at `out` is always a verified export.
"""

from __future__ import annotations

import gc
import json
import math
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import psutil
import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils.hub import convert_file_size_to_int

from ..config import load_recipe
from ..core.logps import completion_token_logps
from ..data.batches import collate_completions, forward_inputs, to_device
from ..data.examples import EncodedExample
from ..data.pairs import build_datasets
from ..data.tokenize import encode_reply
from ..errors import UserError, first_line
from ..model.adapters import reference_model
from ..model.load import DTYPES as TORCH_DTYPES
from ..model.load import base_path
from ..progress import progress
from ..run.rundir import RunDir
from ..run.source import Source
from .tolerance import TOLERANCES, VERIFY_PAIRS

_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
_VERIFY_PROMPT_TOKENS, _VERIFY_COMPLETION_TOKENS = 192, 64  # per sequence: the end of the prompt, a reply's start
# used when the run's data cannot be read (offline, moved, or an adapter folder without a run)
FIXED_PAIRS = [
    ("Write a short review of a film you liked.", "A warm, funny film with a clever plot and fine acting."),
    ("What is the capital of France?", "Paris is the capital of France."),
    ("Give one tip for sleeping better.", "Keep the same bedtime every night and put screens away an hour before."),
    ("Explain a preference pair in one sentence.", "Two answers to one prompt, one marked better than the other."),
]


# ------------------------------------------------------------------ messages (shared by pipeline.py and hub.py)


def log_stderr(msg: str) -> None:
    """The default `log` of an export: one message per line on stderr."""
    print(msg, file=sys.stderr)


def format_size(n: float) -> str:
    """Bytes in decimal units, as the Hub shows them: 1.0 kB, 2.5 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e5 else str(n)


# ------------------------------------------------------------------------------------------- sizes and disk


@dataclass
class SizeEstimate:
    params: int  # parameters of the base (shared tensors counted once, as they are saved)
    how: str  # where the count comes from, in words
    disk_bytes: int  # the export folder
    ram_bytes: int  # peak memory of the merge on its device
    check_dtype: str  # the dtype the merge is checked in: fp32 where it fits, else the export's


def count_parameters(config, base: str, trust_remote_code: bool = False) -> tuple[int, str] | None:
    """(parameters, how counted): the architecture built from `config` on the meta device (no memory), or
    else the tensor shapes in the base folder's safetensors headers. None when neither works."""
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        return sum(p.numel() for p in model.parameters()), "counted from the base's config"
    except Exception:  # an architecture that cannot be built on the meta device
        pass
    files = sorted(Path(base).expanduser().glob("*.safetensors")) if Path(base).expanduser().is_dir() else []
    if not files:
        return None
    n = 0
    for f in files:  # safetensors: 8-byte little-endian header length, then a JSON header of shapes
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for name, info in header.items():
            if name != "__metadata__":
                n += math.prod(info["shape"])
    return n, "read from the shapes in the base's safetensors files"


def check_disk(folder: Path, need: int) -> None:
    """Refuse when the filesystem that will hold `folder` has less than `need` bytes free."""
    probe = folder.expanduser().absolute()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise UserError(
            f"not enough disk space for the export: it needs about {format_size(need)} in {probe}, which has "
            f"{format_size(free)} free; free some space or choose another --out"
        )


def folder_bytes(folder: Path, skip: tuple[str, ...] = ()) -> int:
    """Bytes of every file under `folder`, leaving out the file names in `skip`."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and f.name not in skip)


def _free_memory(device) -> Optional[int]:
    try:
        if device.type == "cpu":
            return psutil.virtual_memory().available
        if device.type == "cuda":
            return torch.cuda.mem_get_info(device)[0]
    except Exception:
        return None
    return None


def plan_merge(
    src: Source, out: Path, dtype: str, device, max_shard_size: str, trust_remote_code: bool, log=log_stderr
) -> Optional[SizeEstimate]:
    """What the merge needs, said before anything heavy starts, and the dtype it is checked in (see
    merge_and_verify: fp32 where the base fits in it). Refuses (UserError) a bad `max_shard_size`, a base
    checkpoint that is already quantized, and a disk that cannot hold the export; warns when `device` looks
    short of memory. None when the base's parameters cannot be counted (then nothing is checked, and the merge
    is checked in `dtype`)."""
    try:
        shard_bytes = convert_file_size_to_int(max_shard_size)
    except (ValueError, AttributeError):
        raise UserError(f"--max-shard-size {max_shard_size}: expected a size such as 2GB or 500MB") from None
    path, revision = base_path(src.base_name, src.revision, src.gguf_file)
    config = _load_config(path, revision, trust_remote_code)
    _refuse_prequantized(config, src.base_name)
    counted = count_parameters(config, path, trust_remote_code)
    if counted is None:
        log(f"notice: cannot count the parameters of '{src.base_name}'; no disk or memory estimate, and the merge "
            f"is checked in {dtype}")
        return None
    params, how = counted
    weights = params * _BYTES[dtype]
    extra = folder_bytes(src.adapter_dir, skip=("adapter_model.safetensors", "adapter_model.bin")) + 2**20
    adapter = sum(f.stat().st_size for f in src.adapter_dir.glob("adapter_model.*"))  # fp32, as trained
    free = _free_memory(device)
    in_fp32 = params * _BYTES["fp32"] + adapter
    check = "fp32" if free is None or free >= 1.2 * in_fp32 else dtype
    ram = max(params * _BYTES[check] + adapter, weights + min(shard_bytes, weights) + adapter)
    estimate = SizeEstimate(params, how, weights + extra, ram, check)
    where = "RAM" if device.type == "cpu" else device.type + " memory"
    log(
        f"merge: '{src.base_name}' has {_count(params)} parameters ({how}); the merged {dtype} model "
        f"needs about {format_size(estimate.disk_bytes)} of disk in {out.parent} and about "
        f"{format_size(estimate.ram_bytes)} of {where} "
        + (f"(the model in fp32, where the merge is checked, then saved in {dtype})" if check != dtype else
           f"(one {dtype} copy of the model, plus one shard while saving)")
        + ("" if Path(path).is_dir() else "; the base's own download, if it is not cached yet, goes to the "
           "Hugging Face cache besides")
    )
    if check != "fp32":
        log(f"notice: the base in fp32 ({format_size(in_fp32)}) does not fit the {format_size(free or 0)} free "
            f"on {device}, so the merge is checked in {dtype}, where rounding alone moves log-probs by up to "
            "tenths of a nat on a deep model; if the check fails for that, pass a looser --tolerance")
    check_disk(out, estimate.disk_bytes)
    if free is not None and free < estimate.ram_bytes:
        log(f"warning: about {format_size(estimate.ram_bytes)} needed, {format_size(free)} available on {device}; "
            "the merge may run out of memory")
    return estimate


# ---------------------------------------------------------------------------------------- loading the base


def parse_device(spec: str):
    """`--device` as a torch.device; UserError for a malformed one or a GPU that is not there."""
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UserError(f"--device {spec}: not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {spec}: no CUDA GPU is available here")
    return device


def _load_config(base: str, revision, trust_remote_code: bool):
    try:
        return AutoConfig.from_pretrained(base, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the config of the base model '{base}': {first_line(exc)}") from None


def _refuse_prequantized(config, base_name: str) -> None:
    quant = getattr(config, "quantization_config", None)
    if quant is None:
        return
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    raise UserError(
        f"refusing to merge into '{base_name}': its checkpoint is already quantized (quantization_config, "
        f"method {method or 'unknown'}). Merging into 4-bit weights rounds the adapter's update away and damages "
        "the result; pass --base with the original 16-bit model, or export the adapter alone (without --merge)"
    )


def _load_model(path: str, dtype: str, device, revision=None, trust_remote_code=False):
    # Not model.load_base_model: that one quantizes when the recipe asks, freezes the weights and sets
    # use_cache=False, which save_pretrained would write into the merged model's config.json.
    kwargs: dict[str, Any] = dict(revision=revision, dtype=TORCH_DTYPES[dtype], trust_remote_code=trust_remote_code)
    if device.type != "cpu":
        # placed as it loads, never staged whole in CPU memory
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": str(device)}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the model '{path}': {first_line(exc)}") from None
    return model.eval()


# ---------------------------------------------------------------------------------------------------- merge


def _quantized_layers(model) -> dict[str, int]:
    try:
        from bitsandbytes.nn import Linear4bit, Linear8bitLt  # noqa: PLC0415 - optional heavy dependency
    except Exception:  # no usable bitsandbytes: the model cannot hold its layers either
        return {}
    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, (Linear4bit, Linear8bitLt)):
            counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    return counts


def merge_adapter(model):
    """Merge a peft LoRA model into its base with `merge_and_unload` and return the plain transformers model.

    Refuses a base whose layers are bitsandbytes 4-bit (or 8-bit): peft would dequantize, add the update and
    quantize again, rounding the adapter's small update onto the 4-bit grid, which damages the result."""
    quantized = _quantized_layers(model)
    if quantized:
        what = ", ".join(f"{n} bitsandbytes {name} layers" for name, n in quantized.items())
        raise UserError(
            f"refusing to merge: the model holds {what}. Merging into 4-bit weights rounds the adapter's update "
            "onto the 4-bit grid and damages the result; load the base in 16-bit (bf16, fp16 or fp32) and "
            "merge there (lora-dpo export --merge does)"
        )
    if not hasattr(model, "merge_and_unload"):
        raise TypeError(f"expected a peft model with an adapter, got {type(model).__name__}")
    try:
        return model.merge_and_unload(safe_merge=True)  # safe_merge: refuse NaNs instead of writing them
    except ValueError as exc:
        raise UserError(f"the merge produced invalid weights: {first_line(exc)}") from None


def merge_and_verify(
    folder: Path, src: Source, sequences, data: str, dtype: str, device, max_shard_size: str,
    tolerance: Optional[float], trust_remote_code: bool, log=log_stderr, check_dtype: Optional[str] = None,
) -> Verification:  # fmt: skip
    """Load the base in `check_dtype` (default `dtype`) on `device` with the adapter, score `sequences`
    ([(prompt_ids, completion_ids)], described by `data`) with base + adapter and with the base alone, merge,
    score the merged model (the merge's check), cast it to `dtype`, save it into `folder` as safetensors shards of
    at most `max_shard_size`, reload what was written, as a user will, and score it again (the files' check).
    Returns the comparison, passed or not: the caller keeps or discards `folder`.

    Why the check runs in fp32 where it can: the merge is exact arithmetic there (merged and base + adapter agree
    to ~1e-5 nats), so any lost, doubled or misplaced update shows. In bf16 the merged weights round(W + BA) and
    the unmerged round(W) + BA differ by one rounding of every weight, which on a 30-layer real model moves
    log-probs by up to 0.2-0.3 nats: more than the effect of a lightly trained adapter, so no bf16 tolerance can
    both pass a correct merge and catch a lost one. That rounding is the export dtype's, not the merge's: it is
    measured and reported (Verification.rounding), not judged."""
    check_dtype = check_dtype or dtype
    log(f"loading '{src.base_name}' in {check_dtype} on {device}")
    path, revision = base_path(src.base_name, src.revision, src.gguf_file)
    model = _load_model(path, check_dtype, device, revision, trust_remote_code)
    try:
        model = PeftModel.from_pretrained(model, str(src.adapter_dir))
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        why = first_line(exc)
        raise UserError(f"the adapter in {src.adapter_dir} does not fit '{src.base_name}': {why}") from None
    model.eval()
    # both references before the merge changes the weights in place
    reference = completion_logps(model, sequences, "scoring with base + adapter")
    with reference_model(model):
        bare = completion_logps(model, sequences, "scoring with the base alone")
    log(f"merging the adapter into the base ({check_dtype})")
    merged = merge_adapter(model)
    in_memory = completion_logps(merged, sequences, "scoring with the merged model") if check_dtype != dtype else None
    with torch.no_grad():  # the weights in the export dtype, one by one (the fp32 copy is freed as it goes); not
        for param in merged.parameters():  # merged.to(dtype), which would round the rotary frequencies as well
            param.data = param.data.to(TORCH_DTYPES[dtype])
    cast = completion_logps(merged, sequences, f"scoring the merged model in {dtype}") if check_dtype != dtype else None
    log(f"saving the merged model in {dtype} ({max_shard_size} shards at most)")
    merged.save_pretrained(str(folder), max_shard_size=max_shard_size)  # safetensors, generation_config.json
    del model, merged
    gc.collect()  # peft's wrappers hold reference cycles: free the merged copy before the reload

    log("reloading what was saved, as a user will, to check it")
    reloaded = _load_model(str(folder), dtype, device, trust_remote_code=trust_remote_code)
    saved = completion_logps(reloaded, sequences, "scoring the saved model")
    if check_dtype == dtype:
        verification = compare_logps(saved, reference, bare, dtype, data, tolerance)
    else:
        verification = compare_logps(in_memory, reference, bare, check_dtype, data, tolerance, saved=saved, cast=cast,
                                     saved_dtype=dtype)
    verification.saved_logps, verification.bare_logps = saved, bare
    return verification


# ----------------------------------------------------------------------------------------------- verification


BLIND = "the adapter's effect is within the tolerance, so this check cannot tell a merge that lost it from rounding"


@dataclass
class Verification:
    max_abs_diff: float  # largest |log p_merged - log p_base+adapter| over the completion tokens, nats
    atol: float
    rtol: float
    tokens: int  # completion tokens compared
    adapter_effect: float  # largest |log p_base+adapter - log p_base|: what a merge that lost the adapter would show
    data: str  # what was scored, in words
    passed: bool
    blind: bool  # the adapter's effect is within the tolerance: the check cannot see a lost adapter
    checked_in: str = "fp32"  # the dtype of the merge's check
    saved_dtype: Optional[str] = None  # the dtype the model was saved in, when not checked_in
    reload_diff: Optional[float] = None  # largest |log p_saved - log p_merged cast to saved_dtype|: the files' check
    rounding: Optional[float] = None  # largest |log p_saved - log p_base+adapter|: what saved_dtype's rounding moves
    # per-token log-probs of the saved model and of the base alone (for the GGUF check: export/gguf.py)
    saved_logps: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)
    bare_logps: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)

    @property
    def rounding_exceeds_adapter(self) -> bool:
        """The saved dtype's rounding moves log-probs more than the adapter does: it keeps the adapter loosely."""
        return self.rounding is not None and self.rounding > self.adapter_effect

    def summary(self) -> str:
        text = (
            f"Merged and checked in {self.checked_in}: largest per-token log-prob difference, merged vs base + "
            f"adapter, {self.max_abs_diff:.2e} nats (tolerance {self.atol:g} + {self.rtol:g}·|log p|) over "
            f"{self.tokens} completion tokens of {self.data}; the adapter itself moves these log-probs by up to "
            f"{self.adapter_effect:.2e}"
        )
        if self.saved_dtype is not None:
            text += (
                f". Saved in {self.saved_dtype} and reloaded: {self.reload_diff:.2e} nats from the merge cast to "
                f"{self.saved_dtype}; that rounding moves log-probs by up to {self.rounding:.2e} nats from base + "
                f"adapter in {self.checked_in}"
            )
        if self.rounding_exceeds_adapter:
            text += f". Warning: {ROUNDING.format(dtype=self.saved_dtype)}"
        return text + (f". Warning: {BLIND}" if self.blind else "")


ROUNDING = ("{dtype} rounding moves these log-probs more than the adapter does, so the {dtype} model keeps the "
            "adapter's effect only roughly; --dtype fp32, or the adapter alone, keeps it whole")


def verification_sequences(src: Source, tokenizer, n: int = VERIFY_PAIRS, log=log_stderr):
    """[(prompt_ids, completion_ids)] for 2n sequences and what they are: the run's held-out pairs when its
    data can be read, else FIXED_PAIRS rendered with the tokenizer's chat template."""
    pairs, what = [], ""
    if src.run_dir is not None:
        try:
            recipe = load_recipe(RunDir(src.run_dir).config)
            train_pairs, eval_pairs, _ = build_datasets(recipe.data, tokenizer, recipe.train.seed)
            pairs = [(p.prompt_ids, c) for p in (eval_pairs or train_pairs)[:n] for c in (p.chosen_ids, p.rejected_ids)]
            what = f"{len(pairs) // 2} {'held-out' if eval_pairs else 'training'} pairs of the run"
        except Exception as exc:  # offline, a moved data file, an old recipe: fixed prompts check a merge as well
            log(f"notice: the run's data cannot be read ({first_line(exc)}); verifying on fixed prompts instead")
    if not pairs:
        fixed = FIXED_PAIRS[: max(1, n)]
        pairs = [encode_reply(tokenizer, p, r) for p, r in fixed]
        what = f"{len(pairs)} fixed prompts and replies"
    cut = [(p[-_VERIFY_PROMPT_TOKENS:], c[:_VERIFY_COMPLETION_TOKENS]) for p, c in pairs]
    return cut, what


def completion_logps(model, sequences, desc: Optional[str] = None) -> torch.Tensor:
    """[M] float32 log p of every completion token of `sequences` ([(prompt_ids, completion_ids)]; M is their
    completion tokens in all). Scored as training scores them (core/logps.completion_token_logps: the output head
    in chunks, softcapping and logit scale included), one sequence per forward. `desc`: a progress bar's title."""
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for prompt, completion in sequences if desc is None else progress(sequences, desc=desc, unit="sequence"):
            batch = collate_completions([EncodedExample(0, "", prompt, completion, True)], pad_id=0)
            out.append(completion_token_logps(model, forward_inputs(to_device(batch, device))).cpu())
    return torch.cat(out)


def compare_logps(merged, reference, bare, dtype: str, data: str, tolerance: Optional[float] = None, *,
                  saved=None, cast=None, saved_dtype: Optional[str] = None) -> Verification:
    """Check merged against base+adapter (`reference`) token by token, in `dtype`; `bare` is the base alone. All
    are [M] float32 per-token log-probs of the same completion tokens. When the model was saved in another dtype
    (`saved_dtype`): `saved` is the reloaded model's, checked against `cast` (the merged model cast to it)."""
    atol, rtol = (tolerance, 0.0) if tolerance is not None else TOLERANCES[dtype]
    diff = (merged - reference).abs()
    allowed = atol + rtol * reference.abs()
    finite = bool(merged.isfinite().all())
    passed = finite and bool((diff <= allowed).all())
    reload_diff = rounding = None
    if saved_dtype is not None:
        finite = finite and bool(saved.isfinite().all())
        reload_diff = float((saved - cast).abs().max()) if finite else float("nan")
        s_atol, s_rtol = TOLERANCES[saved_dtype]
        passed = passed and finite and bool(((saved - cast).abs() <= s_atol + s_rtol * cast.abs()).all())
        rounding = float((saved - reference).abs().max()) if finite else float("nan")
    return Verification(
        max_abs_diff=float(diff.max()) if finite else float("nan"),
        atol=atol,
        rtol=rtol,
        tokens=int(reference.numel()),
        adapter_effect=float((reference - bare).abs().max()),
        data=data,
        passed=passed,
        blind=bool(((reference - bare).abs() <= allowed).all()),
        checked_in=dtype,
        saved_dtype=saved_dtype,
        reload_diff=reload_diff,
        rounding=rounding,
    )
