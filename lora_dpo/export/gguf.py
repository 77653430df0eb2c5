"""The GGUF hand-off: a merged export converted by llama.cpp's own converter (convert_hf_to_gguf.py) into the file
llama.cpp, Ollama and LM Studio load, then read back and checked, as the merge itself is.

Why llama.cpp's converter and not a writer of our own: GGUF is llama.cpp's format, and its converter is where the
per-architecture tensor names, the q/k permutation of Llama-style attention, the tokenizer's pre-tokenizer name and
the chat template are kept right for every model family. It comes from the package index: the source distribution
of llama-cpp-python carries llama.cpp's tree, and its converter, `conversion/` and `gguf-py/` (the converter's own
gguf package, matched to it) are extracted once into `$LORA_DPO_CACHE/llama.cpp/` (`--llama-cpp DIR` uses a checkout
of your own instead). It needs `sentencepiece` besides torch and transformers: `pip install 'lora-dpo[gguf]'`.

The check: transformers reads the GGUF file back (its GGUF reader undoes the converter's permutations), and the
completion log-probs of the merge check's sequences are compared with those of the merged model as saved, in the
same dtype, and the GGUF's tokenizer must encode the same text to the same ids. A lossless type (f32, or the saved
dtype itself) must agree within the reload tolerance of that dtype. A rounding type (q8_0, f16 from bf16) is
measured: it must keep the model nearer the merged one than the base without the adapter is (mean per-token
difference), and a warning says when its rounding moves log-probs more than the adapter does. K-quants (q4_k_m and
the like) are llama.cpp's `llama-quantize` binary's work, on the bf16 file this writes.
"""

from __future__ import annotations

import collections
import importlib.util
import os
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..errors import UserError, first_line
from ..model.gguf import unpacked
from ..model.index import Pinned, downloaded
from ..paths import build_once, cache_root
from .merge import TORCH_DTYPES, completion_logps, log_stderr
from .tolerance import TOLERANCES

# bytes per parameter of each type (q8_0: 32 int8 weights and one fp16 scale per block), for the disk estimate
GGUF_BYTES = {"bf16": 2.0, "f16": 2.0, "f32": 4.0, "q8_0": 34 / 32}
_AS_DTYPE = {"bf16": "bf16", "f16": "fp16", "f32": "fp32"}  # a GGUF type that is a merge dtype, by that dtype's name
CONVERTER = Pinned("llama-cpp-python", "0.3.36", "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
                   wheel=False, size="~75 MB, of which ~3 MB are kept")
SCRIPT = "convert_hf_to_gguf.py"
_KEEP = (SCRIPT, "conversion/", "gguf-py/", "LICENSE")  # what the converter needs of llama.cpp's tree


def needs() -> None:
    """UserError before anything starts when a package the conversion and its check need is missing."""
    missing = [name for name in ("gguf", "sentencepiece") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"--gguf: needs {' and '.join(missing)} (llama.cpp's converter and transformers' GGUF "
                        "reader): pip install 'lora-dpo[gguf]'")


def converter(llama_cpp: Optional[str] = None, log=log_stderr) -> Path:
    """The folder holding llama.cpp's convert_hf_to_gguf.py: `llama_cpp` (a checkout) when given, else llama.cpp's
    tree from the llama-cpp-python source distribution, extracted once into the cache."""
    if llama_cpp is not None:
        folder = Path(llama_cpp).expanduser()
        if not (folder / SCRIPT).is_file():
            raise UserError(f"--llama-cpp {llama_cpp}: no {SCRIPT} there; give the folder of a llama.cpp checkout")
        return folder
    target = cache_root() / "llama.cpp" / f"{CONVERTER.package}-{CONVERTER.version}"
    return build_once(target, _extract, f"llama.cpp's converter ({CONVERTER.requirement})")


def _extract(folder: Path) -> None:
    with downloaded(CONVERTER, "llama.cpp's GGUF converter") as archive, tarfile.open(archive) as tar:
        root = f"{CONVERTER.package.replace('-', '_')}-{CONVERTER.version}/vendor/llama.cpp/"
        members = [m for m in tar.getmembers() if m.name.startswith(root) and (m.isfile() or m.isdir())
                   and m.name[len(root):].startswith(_KEEP)]
        if not any(m.name == root + SCRIPT for m in members):
            raise UserError(f"{archive.name}: has no {SCRIPT}; not used")
        for member in members:
            member.name = member.name[len(root):]
        tar.extractall(folder, members=members, filter="data")


def convert(merged: Path, out_file: Path, gguf_type: str, script_dir: Path, log=log_stderr) -> None:
    """Run llama.cpp's converter on the merged model folder `merged`, writing `out_file` in `gguf_type`; its own
    progress goes to stderr as it runs. UserError naming what it could not do when it fails."""
    cmd = [sys.executable, str(script_dir / SCRIPT), str(merged), "--outfile", str(out_file), "--outtype", gguf_type]
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # its own gguf-py, matched to it
    log(f"converting to GGUF ({gguf_type}) with llama.cpp's {SCRIPT} from {script_dir}")
    tail: collections.deque = collections.deque(maxlen=30)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        for line in proc.stdout:  # one line per tensor and the chat template: kept for an error; shown: its warnings,
            tail.append(line.rstrip())  # its finished writing bar and its last word
            # (its bar's redraws arrive as lines: text mode reads tqdm's carriage returns as newlines)
            writing = line.startswith("Writing") and "100%" in line
            if line.startswith(("WARNING", "ERROR")) or writing or "successfully exported" in line:
                sys.stderr.write(line)
                sys.stderr.flush()
    if proc.returncode != 0 or not out_file.is_file():
        why = next((line for line in reversed(tail) if line.strip() and not line.startswith(" ")), "no output")
        hint = (" (pip install 'lora-dpo[gguf]' installs what the converter needs)" if "ModuleNotFoundError" in why
                else "")
        raise UserError(f"llama.cpp's converter could not convert the merged model to GGUF: {why}{hint}")


@dataclass
class GgufCheck:
    file: Path
    gguf_type: str
    saved_dtype: str
    max_diff: float  # largest |log p_gguf - log p_saved| over the completion tokens, nats
    mean_diff: float  # mean of the same
    adapter_mean: float  # mean |log p_saved - log p_base|: the adapter's effect on the same tokens
    adapter_max: float
    lossless: bool  # gguf_type keeps the saved weights exactly (f32, or the saved dtype)
    same_tokens: bool  # the GGUF's tokenizer encodes the check's text to the same ids
    chat_template: bool  # the GGUF carries the tokenizer's chat template
    passed: bool

    @property
    def rounding_exceeds_adapter(self) -> bool:
        return not self.lossless and self.max_diff > self.adapter_max

    def summary(self) -> str:
        text = (f"GGUF {self.gguf_type} ({self.file.name}) read back by transformers: largest per-token log-prob "
                f"difference from the saved {self.saved_dtype} model {self.max_diff:.2e} nats (mean "
                f"{self.mean_diff:.2e}; the adapter moves them by {self.adapter_mean:.2e} on average, "
                f"{self.adapter_max:.2e} at most); tokenizer {'the same' if self.same_tokens else 'DIFFERENT'}, "
                f"chat template {'kept' if self.chat_template else 'missing'}")
        if self.rounding_exceeds_adapter:
            text += (f". Warning: {self.gguf_type} rounding moves some log-probs more than the adapter does; the bf16 "
                     "GGUF keeps the merged model exactly")
        return text


def check_gguf(folder: Path, file: Path, gguf_type: str, saved_dtype: str, sequences, saved: torch.Tensor,
               bare: torch.Tensor, device, log=log_stderr) -> GgufCheck:
    """Read `file` (in `folder`) back with transformers in `saved_dtype` and compare its completion log-probs on
    `sequences` with `saved` (the saved merged model's) and `bare` (the base alone's); its tokenizer must encode
    the text of the sequences as the merged model's tokenizer (in `folder`) does."""
    log(f"reading {file.name} back with transformers to check it")
    with tempfile.TemporaryDirectory() as alone:  # the file by itself: nothing of the merged folder is read instead
        (Path(alone) / file.name).symlink_to(file.resolve())
        try:
            model = AutoModelForCausalLM.from_pretrained(alone, gguf_file=file.name, dtype=torch.float32)
            gguf_tok = AutoTokenizer.from_pretrained(alone, gguf_file=file.name)
        except ImportError as exc:
            raise UserError(f"reading the GGUF file back needs the `gguf` package: pip install 'lora-dpo[gguf]' "
                            f"({first_line(exc)})") from None
    # in the saved model's dtype, as it was scored (the packed weights dequantised once, not at every matmul)
    model = unpacked(model, TORCH_DTYPES[saved_dtype]).to(device).eval()
    scored = completion_logps(model, sequences, "scoring the GGUF model")
    del model
    tok = AutoTokenizer.from_pretrained(str(folder))
    probe_text = "".join(tok.decode(prompt + completion) for prompt, completion in sequences[:4])
    same = gguf_tok(probe_text, add_special_tokens=False)["input_ids"] == tok(probe_text, add_special_tokens=False)["input_ids"]
    template = not tok.chat_template or _chat_template(file) == tok.chat_template
    diff = (scored - saved).abs()
    finite = bool(scored.isfinite().all())
    max_diff = float(diff.max()) if finite else float("nan")
    mean_diff = float(diff.mean()) if finite else float("nan")
    effect = (saved - bare).abs()
    lossless = gguf_type == "f32" or _AS_DTYPE.get(gguf_type) == saved_dtype
    if lossless:
        atol, rtol = TOLERANCES[saved_dtype]
        close = finite and bool((diff <= atol + rtol * saved.abs()).all())
    else:  # rounding: the file must keep the adapter better than dropping it would
        close = finite and mean_diff < float(effect.mean())
    return GgufCheck(file, gguf_type, saved_dtype, max_diff, mean_diff, float(effect.mean()), float(effect.max()),
                     lossless, same, template, close and same and template)


def _chat_template(file: Path) -> Optional[str]:
    """The chat template the GGUF file carries (its tokenizer.chat_template metadata), or None."""
    from gguf import GGUFReader  # the `gguf` extra (needs() checked it is there)  # noqa: PLC0415

    field = GGUFReader(file).fields.get("tokenizer.chat_template")
    return None if field is None else bytes(field.parts[field.data[0]]).decode("utf-8")


def gguf_name(out: Path, gguf_type: str) -> str:
    return f"{out.name}-{gguf_type}.gguf"

