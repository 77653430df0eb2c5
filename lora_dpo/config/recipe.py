"""Recipes: frozen dataclasses whose every key has its default, its range and its meaning on one line.

A recipe is validated when it is built, by the dataclasses themselves: from YAML (config/load.py) or in Python
(`Recipe(train=TrainConfig(lr=-1))`) alike, a wrong type, a value out of range, a missing required key or two
keys that contradict each other raise one `ConfigError` that names the dotted key, with the same message
either way. Nothing is read with `dict.get(key, default)`, so a misspelt key cannot pass.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Union

from ..core.logps import MASK_ATTENTION
from ..core.losses import LOSSES
from ..errors import ConfigError

REQUIRED = "???"  # marks a key that has no default: the recipe or the command line must set it
# keys that name a model, a file, a dataset, a revision or code: an empty string names nothing (null unsets them)
NAMES = {"output_dir", "train.project", "train.run_name", "model.name", "model.revision", "model.gguf_file", "model.adapter", "data.train", "data.eval",
         "data.rounds", "data.subset", "data.revision", "data.data_dir", "data.data_files", "data.columns",
         "eval.scorer", "online.judge"}
# the columns lora-dpo reads (data/formats.py, data/examples.py): data.columns maps a dataset's own names onto these
DATA_COLUMNS = ("prompt", "chosen", "rejected", "system", "conversations", "messages", "completion", "label",
                "instruction", "input", "output", "tools", "chat_template_kwargs")


def knob(default: Any, must: str | None = None, *, choices: Callable[[], tuple[str, ...]] | None = None):
    """A recipe key's default and what its value must be: `must` is a range ('> 0', '>= 1', 'in [0, 1)',
    'in (0, 1]'; None always passes, for optional keys), `choices` the function that lists the valid values (for
    keys whose values another module registers, such as loss.name). Checked when the dataclass is built."""
    meta = {"must": must, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


_COMPARE = {">": operator.gt, ">=": operator.ge}
_NUMBER = re.compile(r"[-+]?(\d[\d_]*\.?\d*|\.\d+)([eE][-+]?\d+)?")  # a number as people write one
_NOTE = re.compile(r"\s+\([a-z].*\)$")  # '> 0 (why)': the explanation after the range
_INTERVAL = re.compile(r"in ([\[(])\s*([-\d.e]+),\s*([-\d.e]+)\s*([\])])")


def _within(value: Any, must: str) -> bool:
    """Whether `value` satisfies a range written as in `knob` (a parenthesised explanation after it is ignored)."""
    if value is None:
        return True
    rule = _NOTE.sub("", must)
    if m := _INTERVAL.fullmatch(rule):
        low, high = float(m.group(2)), float(m.group(3))
        above = value >= low if m.group(1) == "[" else value > low
        below = value <= high if m.group(4) == "]" else value < high
        return above and below
    op, bound = rule.split()
    return _COMPARE[op](value, float(bound))


class Section:
    """Base of the recipe's dataclasses: coerces and checks every field when an instance is built."""

    _prefix = ""

    def __init_subclass__(cls, section: str = "", **kwargs):
        super().__init_subclass__(**kwargs)
        cls._prefix = f"{section}." if section else ""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        fields = dataclasses.fields(self)  # type: ignore[arg-type]
        for f in fields:
            key, value, tp = self._prefix + f.name, getattr(self, f.name), hints[f.name]
            if dataclasses.is_dataclass(tp):
                if not isinstance(value, tp):
                    raise ConfigError(f"{key}: expected a mapping of keys ({tp.__name__}), got {value!r}")
                continue
            choices = f.metadata.get("choices")
            coerced = coerce(value, Literal[choices()] if choices else tp, key)  # type: ignore[misc]
            object.__setattr__(self, f.name, coerced)
        for f in fields:
            key, value = self._prefix + f.name, getattr(self, f.name)
            if value == REQUIRED:
                raise ConfigError(f"missing required key '{key}'")
            if key in NAMES and any(isinstance(v, str) and not v.strip() for v in _strings(value)):
                raise ConfigError(f"{key}: cannot be empty" + ("" if key in ("output_dir", "model.name", "data.train")
                                                                 else " (null unsets it)"))
            must = f.metadata.get("must")
            if must and not _within(value, must):
                raise ConfigError(f"{key}: must be {must}, got {value!r}")


def _strings(value: Any) -> list:
    """The values of a key: a list's items, a mapping's values, else the value itself."""
    return list(value.values()) if isinstance(value, dict) else value if isinstance(value, list) else [value]


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        key, value = typing.get_args(tp)
        return f"a mapping of {type_name(key)} to {type_name(value)}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Return `value` as type `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads no/off and yes/on as booleans: `mixed_precision: no`
            word = next((w for w in (("no", "off") if not value else ("yes", "on")) if w in typing.get_args(tp)), None)
            if word is not None:
                return word
        elif value in typing.get_args(tp):
            return value
    elif origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError:
                pass
    elif origin is list:
        if isinstance(value, list):
            return [coerce(v, typing.get_args(tp)[0], key) for v in value]
    elif origin is dict:
        if isinstance(value, dict):
            kt, vt = typing.get_args(tp)
            return {coerce(k, kt, key): coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):  # 5e-5: YAML 1.1 reads it as a string
            value = float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # .inf / .nan: a learning rate or beta of inf trains an adapter of NaNs
                raise ConfigError(f"{key}: must be a finite number, got {value!r}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # a numeric-looking name such as a revision `2024`
    raise ConfigError(f"{key}: expected {type_name(tp)}, got {value!r}")


@dataclass(frozen=True)
class ModelConfig(Section, section="model"):
    name: str = REQUIRED  # Hub id or local folder of the base causal LM; `toy` builds the offline toy model
    revision: Optional[str] = None  # Hub branch, tag or commit of `name`
    gguf_file: Optional[str] = None  # a GGUF file (llama.cpp's format) in `name`'s folder or Hub repository: dequantised once into the cache, then loaded like any base
    quantization: Literal["nf4", "none"] = "nf4"  # nf4: 4-bit NormalFloat base (bitsandbytes); none: 16/32-bit
    double_quant: bool = True  # also quantise the 4-bit scales (saves ~0.4 bit per weight)
    quant_storage: Literal["auto", "uint8", "bf16", "fp16", "fp32"] = "auto"  # dtype holding the packed 4-bit weights; auto: uint8, or the compute dtype under FSDP / DeepSpeed ZeRO-3 (which need it to shard them)
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # compute dtype; auto: bf16 where the GPU has it, else fp16 on GPU, fp32 on CPU
    attn_implementation: Optional[str] = None  # e.g. sdpa, eager, flash_attention_2; None lets transformers choose
    gradient_checkpointing: Union[bool, Literal["auto"]] = "auto"  # recompute a layer's activations in backward: far less memory, one more forward of it; auto: the fewest layers whose predicted peak fits the free memory of the device (model/checkpointing.py), every layer where that cannot be predicted
    trust_remote_code: bool = False  # run model code shipped with the checkpoint (only for models you trust)
    adapter: Optional[str] = None  # LoRA adapter (folder, or a run directory with adapter/) the policy starts from, e.g. an SFT run; frozen, it is also the reference


@dataclass(frozen=True)
class LoraConfig(Section, section="lora"):
    r: int = knob(16, '>= 1')  # adapter rank
    alpha: int = knob(32, '> 0')  # scale is alpha / r
    dropout: float = knob(0.05, 'in [0, 1)')  # dropout on the adapter's input
    target_modules: Union[str, list[str]] = "all-linear"  # all-linear: every linear layer but the output head


@dataclass(frozen=True)
class DataConfig(Section, section="data"):
    train: str = REQUIRED  # Hub dataset id, a local .json/.jsonl/.csv/.parquet file, a folder of them or a save_to_disk folder; `toy` for the toy world
    train_split: str = "train"  # split of `train` to read
    subset: Optional[str] = None  # the dataset's configuration (subset) name, as datasets.load_dataset's `name`: a Hub dataset's, or one a local folder's README.md declares
    revision: Optional[str] = None  # Hub branch, tag or commit of `train` (a Hub dataset)
    data_dir: Optional[str] = None  # read only this folder of `train` (a Hub dataset or a local folder)
    data_files: Union[str, list[str], None] = None  # read only these files (glob patterns allowed) of `train` (a Hub dataset or a local folder)
    columns: dict[str, str] = field(default_factory=dict)  # the dataset's names for the columns lora-dpo reads, e.g. {prompt: question, chosen: chosen_response, rejected: rejected_response}; applies to train, eval and rounds
    eval: Optional[str] = None  # held-out data: a split name of `train`, or a dataset id or file; None: eval_fraction of train
    eval_fraction: float = knob(0.05, 'in [0, 1)')  # share of train held out for evaluation when `eval` is not set (0 disables eval)
    max_length: int = knob(1024, '>= 2')  # tokens, prompt + one completion
    max_prompt_length: Optional[int] = knob(None, '>= 1')  # tokens a prompt keeps at least when an example does not fit max_length (truncation: keep_end); None: half of max_length
    truncation: Literal["keep_end", "keep_start"] = "keep_end"  # an example that does not fit max_length (one that fits is never cut): keep_end keeps the prompt's end (at least max_prompt_length tokens) and the replies' start; keep_start (TRL's) keeps the first max_length tokens, the prompt whole
    on_bad_rows: Literal["error", "skip"] = "error"  # malformed rows stop the run (error) or are skipped and counted
    system_prompt: Optional[str] = None  # prepended as a system message to prompts that have none
    max_rows: Optional[int] = knob(None, '>= 1')  # read at most this many training rows (for quick trials)
    rounds: list[str] = field(default_factory=list)  # iterative DPO: fresh training data for rounds 2, 3, ... (train.rounds - 1 sources); empty: `train` every round

    def __post_init__(self):
        super().__post_init__()
        for ours in self.columns:
            if ours not in DATA_COLUMNS:
                raise ConfigError(f"data.columns.{ours}: not a column lora-dpo reads; map the dataset's columns onto "
                                  f"{', '.join(DATA_COLUMNS)} (for example data.columns.prompt=question)")
        theirs = list(self.columns.values())
        if twice := sorted({c for c in theirs if theirs.count(c) > 1}):
            raise ConfigError(f"data.columns: the column '{twice[0]}' is mapped onto "
                              f"{' and '.join(k for k, v in self.columns.items() if v == twice[0])}; give each its own")

    @property
    def prompt_budget(self) -> int:
        """Tokens a prompt keeps at least when an example must be cut (truncation keep_end): max_prompt_length, else
        half of max_length."""
        return self.max_prompt_length or self.max_length // 2


@dataclass(frozen=True)
class LossConfig(Section, section="loss"):
    name: str = knob("dpo", choices=lambda: tuple(LOSSES))  # a loss of core/losses.py: dpo = sigmoid loss of the DPO paper; simpo, orpo need no reference; kto takes unpaired good/bad examples
    beta: float = knob(0.1, '> 0')  # strength of the KL penalty to the reference; rewards are beta * log(pi/pi_ref)
    label_smoothing: float = knob(0.0, 'in [0, 0.5)')  # assumed share of flipped labels (conservative DPO for dpo, robust DPO for robust)
    length_normalize: Optional[bool] = None  # average log-probs over completion tokens; None: only for ipo
    rpo_alpha: float = knob(0.0, '>= 0')  # weight of the chosen response's per-token NLL added to the loss (RPO); 0: off
    simpo_gamma: float = knob(0.5, '>= 0')  # SimPO's target reward margin (in units of beta x mean log-prob)
    desirable_weight: float = knob(1.0, '> 0')  # KTO: weight of the loss on desirable (label true) examples
    undesirable_weight: float = knob(1.0, '> 0')  # KTO: weight on undesirable examples; raise it when they are rarer
    target_kl: Optional[float] = knob(None, '> 0')  # adaptive beta: steer the sampled KL to the reference (nats per token) toward this; None: fixed beta
    kl_every: int = knob(5, '>= 1')  # adaptive beta: optimizer steps between KL measurements (samples from the policy)
    kl_prompts: int = knob(16, '>= 1')  # adaptive beta: training prompts sampled per KL measurement


@dataclass(frozen=True)
class TrainConfig(Section, section="train"):
    epochs: float = knob(1.0, '> 0')  # passes over the training pairs (fractions allowed)
    max_steps: Optional[int] = knob(None, '>= 1')  # optimizer steps; overrides epochs when set
    batch_size: int = knob(4, '>= 1')  # pairs per forward pass (each pair is two sequences)
    grad_accum: int = knob(1, '>= 1')  # forward passes per optimizer step; pairs per step = batch_size * grad_accum
    lr: float = knob(5e-5, '> 0')  # peak learning rate of the adapter
    weight_decay: float = knob(0.0, '>= 0')  # AdamW decoupled weight decay
    warmup_ratio: float = knob(0.1, 'in [0, 1)')  # share of steps with linear warmup from 0 to lr
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"  # decay after warmup
    max_grad_norm: float = knob(1.0, '>= 0')  # clip the global gradient norm to this (0 disables clipping)
    optimizer: Literal["adamw", "paged_adamw_8bit"] = "adamw"  # paged 8-bit AdamW needs a CUDA GPU
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # autocast; auto follows model.dtype on GPU, no on CPU
    precompute_reference: bool = True  # one reference pass before training instead of one per step
    # -- speed and memory: training/refcache.py, the layout (model/layout.py), data/order.py, model/offload.py --
    reference_cache: Optional[str] = "auto"  # folder of cached reference log-probs, reused across runs and resumes; auto: $LORA_DPO_CACHE/reference_logps; null: off
    shared_prompt: Union[bool, Literal["auto"]] = "auto"  # one row per pair, [prompt | chosen | rejected] with a 4D mask: the prompt is encoded once; auto: on where it is exact (sdpa or eager attention, no sliding window shorter than max_length); pairs only: SFT and KTO examples are one sequence anyway
    group_by_length: bool = False  # steps of similar-length pairs (still exactly the global batch each): less padding (data/order.py; pairs only)
    activation_offload: bool = False  # keep the activations saved for backward in CPU memory: less GPU memory, more PCIe traffic (model/offload.py)
    embeddings_on_cpu: bool = False  # keep the input embedding table in CPU memory (1 GB of an 8B Llama in bf16); no effect when the head shares it (model/offload.py)
    mlp_chunks: int = knob(1, '>= 1')  # run each MLP over this many slices of tokens: its intermediates are held one slice at a time in backward, for one more MLP forward per step (model/tiling.py)
    log_every: int = knob(1, '>= 1')  # optimizer steps between metrics.jsonl rows
    eval_every: Optional[int] = knob(None, '>= 1')  # optimizer steps between evaluations; None: only at the end
    seed: int = knob(42, "in [0, 4294967295] (numpy's seeds)")  # seeds python, numpy and torch; CPU runs are deterministic for a given seed
    save_every: Optional[int] = knob(100, '>= 1')  # optimizer steps between checkpoints (and one at the end); None: only at the end
    keep_last: Optional[int] = knob(2, '>= 1')  # checkpoints kept on disk, newest first; None keeps all
    max_nonfinite_steps: int = knob(3, '>= 1')  # consecutive steps with a NaN/inf loss or gradient (each skipped) that stop the run
    report_to: list[Literal["tensorboard", "wandb", "trackio", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab"]] = field(default_factory=list)  # trackers via accelerate (each needs its package), off by default; metrics.jsonl is always written
    project: Optional[str] = None  # the trackers' project; None: the first of WANDB_PROJECT, MLFLOW_EXPERIMENT_NAME, COMET_PROJECT_NAME, TRACKIO_PROJECT that is set, else lora-dpo
    run_name: Optional[str] = None  # the run's name in the trackers; None: the run directory's name
    rounds: int = knob(1, '>= 1')  # iterative DPO: after each round of `epochs` (or max_steps) the policy becomes the frozen reference

    def pairs_per_step(self, processes: int = 1) -> int:
        """The global batch: examples averaged by one optimizer step, batch_size x grad_accum x processes."""
        return self.batch_size * self.grad_accum * processes


@dataclass(frozen=True)
class EvalConfig(Section, section="eval"):
    batch_size: int = knob(8, '>= 1')  # pairs per evaluation forward pass
    max_pairs: Optional[int] = knob(None, '>= 1')  # evaluate at most this many held-out pairs
    scorer: Optional[str] = None  # `module:function` scoring a generated response (str -> float); None: no behaviour score
    num_prompts: int = knob(32, '>= 0')  # held-out prompts sampled for the behaviour score
    max_new_tokens: int = knob(64, '>= 1')  # tokens generated per prompt for the behaviour score
    temperature: float = knob(1.0, '> 0')  # sampling temperature for the behaviour score (1.0 samples the model's own distribution)
    min_diversity: float = knob(0.5, 'in [0, 1]')  # warn when the samples' distinct-2 falls below this share of the reference's (collapse)


@dataclass(frozen=True)
class OnlineConfig(Section, section="online"):
    enabled: bool = False  # online DPO: each step samples completions for the step's prompts from the policy and trains on the judge's best/worst pair
    judge: Optional[str] = None  # toy (the toy world's truth), module:function scoring (prompt, completions), or reward_model:PATH
    samples: int = knob(2, '>= 2')  # completions sampled per prompt (>= 2)
    max_new_tokens: int = knob(64, '>= 1')  # tokens sampled per completion
    temperature: float = knob(1.0, '> 0 (online DPO needs different samples to rank)')  # sampling temperature of the completions
    top_p: float = knob(1.0, 'in (0, 1]')  # nucleus sampling of the completions


@dataclass(frozen=True)
class Recipe(Section, section=""):
    output_dir: str = REQUIRED  # run directory: config.yaml, metrics.jsonl, adapter/, eval.json
    stage: Literal["dpo", "sft"] = "dpo"  # dpo: preference training (loss.name picks the loss); sft: supervised fine-tuning on responses (lora-dpo sft)
    overwrite: bool = False  # replace a finished or failed run already in output_dir (else refuse: nothing is lost)
    resume: Union[bool, str] = False  # true: continue from the newest complete checkpoint in output_dir; or a checkpoint folder
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)

    def __post_init__(self):
        super().__post_init__()
        check_across_keys(self)


def _names(names: list[str]) -> str:
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else "".join(names)


def check_across_keys(recipe: Recipe) -> None:
    """Rules that tie two keys together."""
    m = recipe.model
    if m.quant_storage not in ("auto", "uint8") and m.dtype != "auto" and m.quant_storage != m.dtype:
        raise ConfigError(
            f"model.quant_storage: a floating storage dtype must equal model.dtype ({m.dtype}), got {m.quant_storage}: "
            "FSDP shards the 4-bit weights together with the other parameters, which are in the compute dtype"
        )
    if recipe.train.shared_prompt is True and m.attn_implementation and m.attn_implementation not in MASK_ATTENTION:
        raise ConfigError(  # (core/logps.py) flash attention takes no custom 4D mask
            f"train.shared_prompt: model.attn_implementation={m.attn_implementation} takes no 4D attention mask; "
            "use sdpa or eager, or set train.shared_prompt=false"
        )
    loss, train, online = recipe.loss, recipe.train, recipe.online
    if recipe.data.rounds and len(recipe.data.rounds) != train.rounds - 1:
        raise ConfigError(f"data.rounds: lists {len(recipe.data.rounds)} sources for train.rounds={train.rounds}; round 1 "
                          f"trains on data.train, so give {train.rounds - 1} (one per later round), or none to train "
                          "on data.train every round")
    if online.enabled and not online.judge:
        raise ConfigError("online.judge: online DPO needs a judge: toy, module:function, or reward_model:PATH")
    if recipe.stage == "sft":
        if online.enabled or train.rounds > 1 or loss.target_kl is not None:
            raise ConfigError("stage: sft trains on given responses; online.enabled, train.rounds and loss.target_kl "
                              "belong to preference training (stage: dpo)")
        return
    spec = LOSSES[loss.name]
    if not spec.needs_reference and (train.rounds > 1 or loss.target_kl is not None):
        key = "train.rounds" if train.rounds > 1 else "loss.target_kl"
        with_reference = [name for name, s in LOSSES.items() if s.needs_reference]
        raise ConfigError(f"{key}: loss.name={loss.name} has no reference model, so there is none to refresh or to "
                          f"steer the KL toward; use {_names(with_reference)}")
    if not spec.paired and train.batch_size < 2:
        raise ConfigError("train.batch_size: KTO estimates its reference point on the batch's mismatched examples, "
                          "which needs at least 2 examples per batch (raise train.batch_size, lower train.grad_accum)")
    if not spec.paired and online.enabled:
        raise ConfigError(f"online.enabled: online DPO trains on ranked pairs; use a pairwise loss (dpo, ipo, ...) not "
                          f"{loss.name}")
