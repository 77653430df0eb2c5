"""Answers side by side: the reference (adapter off) and one tuned adapter, or adapter A and adapter B, for
the same prompts and sampling settings, each answer with its implicit reward beta * log(pi_theta/pi_ref).

    Comparer.load([run_or_adapter, ...], base=None)         one base model, one or two adapters on it
    comparer.compare(prompts, Sampling(...), score_with)    -> list[Row]

`lora-dpo compare` (cli/compare.py) and the app's Compare tab both call this module; the sampling settings are
settings.py's (light: the command line shows their defaults before anything loads). Rewards use the beta each
run ended with (adaptive beta moves it), as the run directory records it.
The reference pane is the same network with peft's adapter switched off (`disable_adapter()`), exactly the
pi_ref of training; A and B are two named adapters on one base, so two runs need one base in memory.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from peft import PeftModel

from ..config import LossConfig, model_config
from ..data.sources import load_rows
from ..errors import UserError, first_line
from ..model.adapters import resolve_adapter
from ..model.load import load_base_model, load_tokenizer_for
from ..model.sampling import generate, implicit_rewards
from ..run.source import Source, resolve_source
from .settings import Sampling

REFERENCE = "reference"
DEFAULT_BETA = LossConfig().beta  # for a bare adapter folder whose run recipe (and so its beta) is unknown


@dataclass
class Adapter:
    label: str  # "tuned" (one adapter), or "A" / "B"
    path: str  # the adapter folder
    run: Optional[str]  # the run directory it came from, when known
    beta: float  # the beta the run ended with (adaptive beta moves it from loss.beta): the units training used


@dataclass
class Row:
    prompt: str
    answers: dict[str, str]  # pane label -> answer ("reference", "tuned") or ("A", "B")
    rewards: dict[str, float]  # pane label -> implicit reward of that answer under the scoring adapter
    score_with: str  # label of the adapter whose beta * log(pi/pi_ref) scores every answer


@dataclass
class Comparer:
    model: object  # a PeftModel with every adapter loaded
    tokenizer: object
    adapters: list[Adapter]
    base: str
    device: str
    panes: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, sources: Sequence[str], base: Optional[str] = None, device: Optional[str] = None,
             beta: Optional[float] = None, log=lambda msg: print(msg, file=sys.stderr)) -> "Comparer":
        """Load the base once (as the first run trained it: 4-bit NF4 unless its recipe says otherwise) and
        attach each adapter under its own name. `sources`: one or two run directories or adapter folders."""
        if not 1 <= len(sources) <= 2:
            raise UserError(f"--adapter: give one adapter (reference vs tuned) or two (A vs B), got {len(sources)}")
        srcs = [resolve_source(s, base) for s in sources]
        if len(srcs) == 2 and srcs[0].base_name != srcs[1].base_name:
            raise UserError(f"--adapter: the two adapters have different bases ({srcs[0].base_name} and "
                            f"{srcs[1].base_name}); compare adapters of one base, or pass --base to force one")
        labels = ["tuned"] if len(srcs) == 1 else ["A", "B"]
        adapters = []
        for label, src in zip(labels, srcs):
            b = beta if beta is not None else src.beta if src.beta is not None else DEFAULT_BETA
            adapters.append(Adapter(label, str(src.adapter_dir), str(src.run_dir) if src.run_dir else None, float(b)))
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model_cfg = _model_config(srcs[0])
        log(f"loading {srcs[0].base_name} ({model_cfg.quantization}) on {dev} with {len(srcs)} adapter(s)")
        model = load_base_model(model_cfg, dev)
        start = ((srcs[0].recipe or {}).get("model") or {}).get("adapter") if len(srcs) == 1 else None
        try:
            model = PeftModel.from_pretrained(model, str(srcs[0].adapter_dir), adapter_name=labels[0])
            if len(srcs) == 2:
                model.load_adapter(str(srcs[1].adapter_dir), adapter_name=labels[1])
            if start:  # the run started from an adapter (an SFT run's): that adapter is its reference
                model.load_adapter(str(resolve_adapter(start)), adapter_name=REFERENCE)
                model.set_adapter(labels[0])
                log(f"reference: the run's start adapter {start}")
        except (OSError, ValueError, RuntimeError) as exc:
            raise UserError(f"cannot attach the adapter to {srcs[0].base_name}: {first_line(exc)}") from None
        model.eval()
        panes = [REFERENCE, "tuned"] if len(srcs) == 1 else ["A", "B"]
        tokenizer = load_tokenizer_for(srcs[0].adapter_dir, model_cfg)
        return cls(model, tokenizer, adapters, srcs[0].base_name, str(dev), panes)

    def compare(self, prompts: Sequence[str], sampling: Sampling = Sampling(), score_with: Optional[str] = None,
                batch_size: int = 8) -> list[Row]:
        """One answer per pane per prompt, all panes sampled from the same seed; every answer scored by the
        implicit reward of `score_with` (default: the first adapter)."""
        prompts = [p for p in (str(p).strip() for p in prompts) if p]
        if not prompts:
            raise UserError("no prompt given: type at least one prompt")
        sampling.check()
        by_label = {a.label: a for a in self.adapters}
        score_with = score_with or self.adapters[0].label
        if score_with not in by_label:
            raise UserError(f"score_with: '{score_with}' is not one of {', '.join(by_label)}")
        settings = dict(max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                        top_p=sampling.top_p, seed=sampling.seed, batch_size=batch_size)
        answers: dict[str, list[str]] = {}
        for pane in self.panes:
            desc = f"answers of {pane}" if len(prompts) > batch_size else None  # (a bar for more than one batch)
            if pane == REFERENCE:  # pi_ref as in training: the adapter off, or the run's start adapter
                answers[pane] = generate(self.model, self.tokenizer, prompts, adapter=False, desc=desc, **settings)
            else:
                self.model.set_adapter(pane)
                answers[pane] = generate(self.model, self.tokenizer, prompts, adapter=True, desc=desc, **settings)
        scorer = by_label[score_with]
        self.model.set_adapter(score_with)
        rewards = {pane: implicit_rewards(self.model, self.tokenizer, prompts, [a or " " for a in texts], scorer.beta)
                   for pane, texts in answers.items()}
        return [Row(p, {pane: answers[pane][i] for pane in self.panes},
                    {pane: rewards[pane][i] for pane in self.panes}, score_with) for i, p in enumerate(prompts)]


def _model_config(src: Source):
    """The run's model section (quantisation, dtype, revision ...) when the run is known, else the defaults."""
    section = dict((src.recipe or {}).get("model") or {})
    section["name"], section["gguf_file"] = src.base_name, src.gguf_file
    if src.revision is not None:
        section["revision"] = src.revision
    return model_config(section)


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a file: plain text with one prompt per line, or a .json/.jsonl/.csv/.parquet dataset with
    a `prompt` column, read by the loader training uses (data/sources.load_rows)."""
    path = Path(path)
    if path.suffix.lower() not in (".json", ".jsonl", ".csv", ".parquet"):
        try:
            return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"--prompts-file {path}: cannot be read: {first_line(exc)}") from None
    prompts = []
    for i, row in enumerate(load_rows(str(path), "train")):
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError(f"--prompts-file {path}: row {i} has no 'prompt' string")
        prompts.append(prompt)
    return prompts


def format_rows(rows: list[Row], comparer: Comparer) -> str:
    lines = [f"base: {comparer.base}"]
    lines += [f"{a.label}: {a.run or a.path} (beta {a.beta:g})" for a in comparer.adapters]
    if rows:
        lines.append(f"rewards: beta * log(pi/pi_ref) of each answer under {rows[0].score_with}")
    width = max(len(p) for p in comparer.panes)
    for i, row in enumerate(rows, 1):
        lines += ["", f"[{i}] {row.prompt}"]
        for pane in comparer.panes:  # an answer's later lines stay in its column, under its first
            first, *rest = row.answers[pane].splitlines() or [""]
            lines.append(f"  {pane:<{width}}  {row.rewards[pane]:+8.3f}  {first}")
            lines += [" " * (width + 14) + line if line.strip() else "" for line in rest]
    return "\n".join(lines)
