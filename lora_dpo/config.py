"""Recipes: dataclasses with their defaults, loaded from YAML with dotted `key=value` overrides.

Validation is strict and happens before any model loads: an unknown key (with the nearest valid key
suggested), a wrong type, a value out of range or a missing required key each raise one `ConfigError`
that names the dotted key. Nothing is read with `dict.get(key, default)`, so a misspelt key cannot pass.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .errors import ConfigError

REQUIRED = "???"  # marks a key that has no default: the recipe or the command line must set it


@dataclass
class ModelConfig:
    name: str = REQUIRED  # Hub id or local folder of the base causal LM; `toy` builds the offline toy model
    revision: Optional[str] = None  # Hub branch, tag or commit of `name`
    quantization: Literal["nf4", "none"] = "nf4"  # nf4: 4-bit NormalFloat base (bitsandbytes); none: 16/32-bit
    double_quant: bool = True  # also quantise the 4-bit scales (saves ~0.4 bit per weight)
    quant_storage: Literal["auto", "uint8", "bf16", "fp16", "fp32"] = "auto"  # dtype holding the packed 4-bit weights; auto: uint8, or the compute dtype under FSDP / DeepSpeed ZeRO-3 (which need it to shard them)
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # compute dtype; auto: bf16 where the GPU has it, else fp16 on GPU, fp32 on CPU
    attn_implementation: Optional[str] = None  # e.g. sdpa, eager, flash_attention_2; None lets transformers choose
    gradient_checkpointing: Union[bool, Literal["auto"]] = "auto"  # recompute a layer's activations in backward: far less memory, one more forward of it; auto: the fewest layers whose predicted peak fits the free memory of the device (checkpointing.py), every layer where that cannot be predicted
    trust_remote_code: bool = False  # run model code shipped with the checkpoint (only for models you trust)
    adapter: Optional[str] = None  # LoRA adapter (folder, or a run directory with adapter/) the policy starts from, e.g. an SFT run; frozen, it is also the reference


@dataclass
class LoraConfig:
    r: int = 16  # adapter rank
    alpha: int = 32  # scale is alpha / r
    dropout: float = 0.05  # dropout on the adapter's input
    target_modules: Union[str, list[str]] = "all-linear"  # all-linear: every linear layer but the output head


@dataclass
class DataConfig:
    train: str = REQUIRED  # Hub dataset id, or a local .json/.jsonl/.csv/.parquet file; `toy` for the toy world
    train_split: str = "train"  # split of `train` to read
    eval: Optional[str] = None  # held-out data: a split name of `train`, or a dataset id or file; None: eval_fraction of train
    eval_fraction: float = 0.05  # share of train held out for evaluation when `eval` is not set (0 disables eval)
    max_length: int = 1024  # tokens, prompt + one completion
    max_prompt_length: Optional[int] = None  # tokens; longer prompts keep their end; None: half of max_length
    on_bad_rows: Literal["error", "skip"] = "error"  # malformed rows stop the run (error) or are skipped and counted
    system_prompt: Optional[str] = None  # prepended as a system message to prompts that have none
    max_rows: Optional[int] = None  # read at most this many training rows (for quick trials)
    rounds: list[str] = field(default_factory=list)  # iterative DPO: fresh training data for rounds 2, 3, ... (train.rounds - 1 sources); empty: `train` every round


@dataclass
class LossConfig:
    name: Literal["dpo", "ipo", "hinge", "robust", "simpo", "orpo", "kto"] = "dpo"  # dpo = sigmoid loss of the DPO paper; simpo, orpo need no reference; kto takes unpaired good/bad examples
    beta: float = 0.1  # strength of the KL penalty to the reference; rewards are beta * log(pi/pi_ref)
    label_smoothing: float = 0.0  # assumed share of flipped labels (conservative DPO for dpo, robust DPO for robust)
    length_normalize: Optional[bool] = None  # average log-probs over completion tokens; None: only for ipo
    rpo_alpha: float = 0.0  # weight of the chosen response's per-token NLL added to the loss (RPO); 0: off
    simpo_gamma: float = 0.5  # SimPO's target reward margin (in units of beta x mean log-prob)
    desirable_weight: float = 1.0  # KTO: weight of the loss on desirable (label true) examples
    undesirable_weight: float = 1.0  # KTO: weight on undesirable examples; raise it when they are rarer
    target_kl: Optional[float] = None  # adaptive beta: steer the sampled KL to the reference (nats per token) toward this; None: fixed beta
    kl_every: int = 5  # adaptive beta: optimizer steps between KL measurements (samples from the policy)
    kl_prompts: int = 16  # adaptive beta: training prompts sampled per KL measurement


@dataclass
class TrainConfig:
    epochs: float = 1.0  # passes over the training pairs (fractions allowed)
    max_steps: Optional[int] = None  # optimizer steps; overrides epochs when set
    batch_size: int = 4  # pairs per forward pass (each pair is two sequences)
    grad_accum: int = 1  # forward passes per optimizer step; pairs per step = batch_size * grad_accum
    lr: float = 5e-5  # peak learning rate of the adapter
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    warmup_ratio: float = 0.1  # share of steps with linear warmup from 0 to lr
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"  # decay after warmup
    max_grad_norm: float = 1.0  # clip the global gradient norm to this (0 disables clipping)
    optimizer: Literal["adamw", "paged_adamw_8bit"] = "adamw"  # paged 8-bit AdamW needs a CUDA GPU
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # autocast; auto follows model.dtype on GPU, no on CPU
    precompute_reference: bool = True  # one reference pass before training instead of one per step
    # -- speed and memory (issue #6): refcache.py, shared_prompt.py, grouping.py, offload.py --
    reference_cache: Optional[str] = "auto"  # folder of cached reference log-probs, reused across runs and resumes; auto: $LORA_DPO_CACHE/reference_logps; null: off
    shared_prompt: Union[bool, Literal["auto"]] = "auto"  # one row per pair, [prompt | chosen | rejected] with a 4D mask: the prompt is encoded once; auto: on where it is exact (sdpa or eager attention, no sliding window shorter than max_length); pairs only: SFT and KTO examples are one sequence anyway
    group_by_length: bool = False  # steps of similar-length pairs (still exactly the global batch each): less padding (grouping.py; pairs only)
    activation_offload: bool = False  # keep the activations saved for backward in CPU memory: less GPU memory, more PCIe traffic (offload.py)
    embeddings_on_cpu: bool = False  # keep the input embedding table in CPU memory (1 GB of an 8B Llama in bf16); no effect when the head shares it (offload.py)
    mlp_chunks: int = 1  # run each MLP over this many slices of tokens: its intermediates are held one slice at a time in backward, for one more MLP forward per step (tiling.py)
    log_every: int = 1  # optimizer steps between metrics.jsonl rows
    eval_every: Optional[int] = None  # optimizer steps between evaluations; None: only at the end
    seed: int = 42  # seeds python, numpy and torch; CPU runs are deterministic for a given seed
    save_every: Optional[int] = 100  # optimizer steps between checkpoints (and one at the end); None: only at the end
    keep_last: Optional[int] = 2  # checkpoints kept on disk, newest first; None keeps all
    max_nonfinite_steps: int = 3  # consecutive steps with a NaN/inf loss or gradient (each skipped) that stop the run
    report_to: list[Literal["tensorboard", "wandb"]] = field(default_factory=list)  # trackers via accelerate, off by default
    rounds: int = 1  # iterative DPO: after each round of `epochs` (or max_steps) the policy becomes the frozen reference


@dataclass
class EvalConfig:
    batch_size: int = 8  # pairs per evaluation forward pass
    max_pairs: Optional[int] = None  # evaluate at most this many held-out pairs
    scorer: Optional[str] = None  # `module:function` scoring a generated response (str -> float); None: no behaviour score
    num_prompts: int = 32  # held-out prompts sampled for the behaviour score
    max_new_tokens: int = 64  # tokens generated per prompt for the behaviour score
    temperature: float = 1.0  # sampling temperature for the behaviour score (1.0 samples the model's own distribution)
    min_diversity: float = 0.5  # warn when the samples' distinct-2 falls below this share of the reference's (collapse)


@dataclass
class OnlineConfig:
    enabled: bool = False  # online DPO: each step samples completions for the step's prompts from the policy and trains on the judge's best/worst pair
    judge: Optional[str] = None  # toy (the toy world's truth), module:function scoring (prompt, completions), or reward_model:PATH
    samples: int = 2  # completions sampled per prompt (>= 2)
    max_new_tokens: int = 64  # tokens sampled per completion
    temperature: float = 1.0  # sampling temperature of the completions
    top_p: float = 1.0  # nucleus sampling of the completions


@dataclass
class Recipe:
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


# Range checks: dotted key -> (predicate, what the value must be). Checked after types.
_RANGES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "lora.r": (lambda v: v >= 1, ">= 1"),
    "lora.alpha": (lambda v: v > 0, "> 0"),
    "lora.dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "data.eval_fraction": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "data.max_length": (lambda v: v >= 2, ">= 2"),
    "data.max_prompt_length": (lambda v: v is None or v >= 1, ">= 1"),
    "data.max_rows": (lambda v: v is None or v >= 1, ">= 1"),
    "loss.beta": (lambda v: v > 0, "> 0"),
    "loss.label_smoothing": (lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
    "loss.rpo_alpha": (lambda v: v >= 0, ">= 0"),
    "loss.simpo_gamma": (lambda v: v >= 0, ">= 0"),
    "loss.desirable_weight": (lambda v: v > 0, "> 0"),
    "loss.undesirable_weight": (lambda v: v > 0, "> 0"),
    "loss.target_kl": (lambda v: v is None or v > 0, "> 0"),
    "loss.kl_every": (lambda v: v >= 1, ">= 1"),
    "loss.kl_prompts": (lambda v: v >= 1, ">= 1"),
    "train.rounds": (lambda v: v >= 1, ">= 1"),
    "train.mlp_chunks": (lambda v: v >= 1, ">= 1"),
    "eval.min_diversity": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "online.samples": (lambda v: v >= 2, ">= 2"),
    "online.max_new_tokens": (lambda v: v >= 1, ">= 1"),
    "online.temperature": (lambda v: v > 0, "> 0 (online DPO needs different samples to rank)"),
    "online.top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "train.epochs": (lambda v: v > 0, "> 0"),
    "train.max_steps": (lambda v: v is None or v >= 1, ">= 1"),
    "train.batch_size": (lambda v: v >= 1, ">= 1"),
    "train.grad_accum": (lambda v: v >= 1, ">= 1"),
    "train.lr": (lambda v: v > 0, "> 0"),
    "train.weight_decay": (lambda v: v >= 0, ">= 0"),
    "train.warmup_ratio": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "train.max_grad_norm": (lambda v: v >= 0, ">= 0"),
    "train.log_every": (lambda v: v >= 1, ">= 1"),
    "train.eval_every": (lambda v: v is None or v >= 1, ">= 1"),
    "train.save_every": (lambda v: v is None or v >= 1, ">= 1"),
    "train.keep_last": (lambda v: v is None or v >= 1, ">= 1"),
    "train.max_nonfinite_steps": (lambda v: v >= 1, ">= 1"),
    "eval.batch_size": (lambda v: v >= 1, ">= 1"),
    "eval.max_pairs": (lambda v: v is None or v >= 1, ">= 1"),
    "eval.num_prompts": (lambda v: v >= 0, ">= 0"),
    "eval.max_new_tokens": (lambda v: v >= 1, ">= 1"),
    "eval.temperature": (lambda v: v > 0, "> 0"),
}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
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
                return _coerce(value, arg, key)
            except ConfigError:
                pass
    elif origin is list:
        if isinstance(value, list):
            return [_coerce(v, typing.get_args(tp)[0], key) for v in value]
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # a numeric-looking name such as a revision `2024`
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, values: Any, prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'recipe'}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean '{prefix}{near[0]}'?" if near else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"unknown key '{dotted}'{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, f"{dotted}.")
        else:
            kwargs[key] = _coerce(value, tp, dotted)
    for key, f in fields.items():  # sections the recipe leaves out are still checked (required keys)
        if key not in kwargs and dataclasses.is_dataclass(hints[key]):
            kwargs[key] = _build(hints[key], {}, f"{prefix}{key}.")
    obj = cls(**kwargs)
    for name, f in fields.items():
        dotted = f"{prefix}{name}"
        value = getattr(obj, name)
        if value == REQUIRED:
            raise ConfigError(f"missing required key '{dotted}'")
        if dotted in _RANGES:
            ok, must = _RANGES[dotted]
            if not ok(value):
                raise ConfigError(f"{dotted}: must be {must}, got {value!r}")
    return obj


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`["train.lr=1e-4", "data.train=x.json"]` -> `[("train.lr", 1e-4), ...]`; values parsed as YAML scalars."""
    out = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}': expected KEY=VALUE, for example train.lr=1e-4")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        # YAML reads 1e-4 as a string (it wants 1.0e-4); accept the form everyone types
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value for c in ".eE") and not value.isalpha() else value
            except ValueError:
                pass
        out.append((key.strip(), value))
    return out


def _fix_yaml_floats(node: Any) -> Any:
    """YAML 1.1 reads `5e-5` as a string; recipes write learning rates that way, so read them as numbers."""
    if isinstance(node, dict):
        return {k: _fix_yaml_floats(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_fix_yaml_floats(v) for v in node]
    if isinstance(node, str):
        try:
            if any(c in node for c in "eE") and node.strip()[:1] in "0123456789.-+":
                return float(node)
        except ValueError:
            pass
    return node


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _with_base(tree: dict, path: Path, seen: tuple = ()) -> dict:
    """`base: other.yaml` (relative to this recipe) makes the recipe a set of changes to another one: its keys
    are merged over the base's, section by section."""
    if "base" not in tree:
        return tree
    base = tree.pop("base")
    if not isinstance(base, str):
        raise ConfigError(f"recipe {path}: base: expected the path of another recipe, got {base!r}")
    base_path = (path.parent / base).resolve()
    if base_path in seen or base_path == path.resolve():
        raise ConfigError(f"recipe {path}: base: {base} includes itself")
    if not base_path.is_file():
        raise ConfigError(f"recipe {path}: base: no such file {base_path}")
    return _merge(_with_base(_read_yaml(base_path), base_path, seen + (path.resolve(),)), tree)


def _read_yaml(path: Path) -> dict:
    """A recipe file's top-level mapping, floats written as 5e-5 read as numbers; ConfigError naming the file."""
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path}: not valid YAML: {exc}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"recipe {path}: expected a mapping of keys at the top level")
    return _fix_yaml_floats(loaded)


def load_recipe(path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> Recipe:
    """Read a YAML recipe (or start from `base`), apply dotted overrides, validate, return a `Recipe`."""
    tree: dict = copy.deepcopy(base or {})  # overrides write into nested dicts: never into the caller's
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe {path}: no such file")
        tree = _with_base(_read_yaml(path), path)
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(tree, key, value)
    recipe = _build(Recipe, tree, "")
    _check_across_keys(recipe)
    return recipe


def _check_across_keys(recipe: Recipe) -> None:
    """Rules that tie two keys together."""
    m = recipe.model
    if m.quant_storage not in ("auto", "uint8") and m.dtype != "auto" and m.quant_storage != m.dtype:
        raise ConfigError(
            f"model.quant_storage: a floating storage dtype must equal model.dtype ({m.dtype}), got {m.quant_storage}: "
            "FSDP shards the 4-bit weights together with the other parameters, which are in the compute dtype"
        )
    from .shared_prompt import MASK_ATTENTION

    if recipe.train.shared_prompt is True and m.attn_implementation and m.attn_implementation not in MASK_ATTENTION:
        raise ConfigError(  # (shared_prompt.py) flash attention takes no custom 4D mask
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
    reference_free = loss.name in REFERENCE_FREE
    if reference_free and (train.rounds > 1 or loss.target_kl is not None):
        key = "train.rounds" if train.rounds > 1 else "loss.target_kl"
        raise ConfigError(f"{key}: loss.name={loss.name} has no reference model, so there is none to refresh or to "
                          "steer the KL toward; use dpo, ipo, hinge, robust or kto")
    if loss.name == "kto" and train.batch_size < 2:
        raise ConfigError("train.batch_size: KTO estimates its reference point on the batch's mismatched examples, "
                          "which needs at least 2 examples per batch (raise train.batch_size, lower train.grad_accum)")
    if loss.name == "kto" and online.enabled:
        raise ConfigError("online.enabled: online DPO trains on ranked pairs; use a pairwise loss (dpo, ipo, ...) not kto")


REFERENCE_FREE = frozenset({"simpo", "orpo"})  # losses computed from the policy alone: no reference pass


def model_config(section: dict) -> ModelConfig:
    """A recipe's `model` section (e.g. a run's config.yaml) as a validated ModelConfig; unknown keys (from
    another version) are ignored."""
    known = set(ModelConfig.__dataclass_fields__)
    return _build(ModelConfig, {k: v for k, v in section.items() if k in known}, "model.")


def to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write the resolved recipe (every key, defaults included) as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False))
