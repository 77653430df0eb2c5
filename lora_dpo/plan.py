"""`lora-dpo plan RECIPE --gpu-memory 8GB`: predict a recipe's peak GPU memory and propose settings that fit.

The prediction is a memory model built from the model's configuration (AutoConfig: a Hub id or a local
folder; no weights are read) and the recipe. Its terms, in bytes (s: bytes per element of the compute dtype,
tokens: the worst batch, every sequence at max_length, 2 x batch_size x max_length):

    base weights       linear layers in 4-bit NF4: 0.5 byte per weight plus the quantisation state
                       (an 8-bit absmax per 64 weights and an fp32 one per 256 blocks with double quantisation,
                       an fp32 absmax per 64 without); 16-bit (s) without quantisation
    embeddings, head   vocab x hidden x s each (one when tied); bitsandbytes keeps them in 16 bits
    adapter            LoRA weights and gradients in fp32 (peft upcasts them), 8 bytes per parameter
    optimizer          AdamW: two fp32 moments (8 bytes per parameter); paged 8-bit AdamW: 2
    checkpointed acts  layers x tokens x hidden x s: each layer's input, kept for backward
    layer recompute    tokens x (one layer's saved activations + its gradients): backward recomputes one
                       layer at a time
    log-prob head      one chunk of float32 logits (logps.LOGITS_BUDGET_BYTES, whatever the vocabulary), the
                       exp() temporary of its log-softmax, its gradient, the head's output in s; the gathered
                       completion hidden states
    dequantised weight the largest linear layer in s, twice (forward and backward), made per matmul
    attention mask     shared-prompt rows only: batch x width^2 booleans

`allocated` is what `torch.cuda.max_memory_allocated` would report; the device total adds the CUDA context and
the caching allocator's slack (CONTEXT_BYTES, ALLOCATOR_SLACK). Every term is a formula here, not a
measurement. Checked on an H100 (benchmarks/RESULTS.md): Llama-3.1-8B architecture, pairs of 2 x 2048 tokens,
predicted within 7% of `max_memory_allocated` (+6.5%, and -5.6% with activation offload); on data shorter
than max_length it over-predicts (+26% on the gpu-1b workload), because it sizes the worst batch.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass, replace

from .errors import ConfigError, first_line
from .logps import LOGITS_BUDGET_BYTES

GiB = 2**30
CONTEXT_BYTES = int(0.5 * GiB)  # CUDA context + cuBLAS workspace: outside the allocator's count
ALLOCATOR_SLACK = 0.05  # fragmentation of the caching allocator, as a share of the allocated peak
_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "auto": 2}  # auto on a GPU is bf16 or fp16


@dataclass(frozen=True)
class Shape:
    """What the memory model needs from a decoder-only transformer's configuration."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool

    @property
    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer (attention q, k, v, o; MLP gate, up, down)."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]


def shape_from_config(config) -> Shape:
    text = getattr(config, "text_config", None) or config  # multimodal configs nest the language model's
    heads = text.num_attention_heads
    return Shape(
        hidden=text.hidden_size, layers=text.num_hidden_layers, heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        intermediate=text.intermediate_size, vocab=text.vocab_size,
        tied=bool(getattr(text, "tie_word_embeddings", False)),
    )


def load_shape(model_cfg) -> Shape:
    """The model's Shape from its configuration file alone (AutoConfig: a Hub id or a local folder)."""
    from transformers import AutoConfig

    from .model import resolve_model_name

    name = resolve_model_name(model_cfg.name)
    try:
        config = AutoConfig.from_pretrained(name, revision=model_cfg.revision,
                                            trust_remote_code=model_cfg.trust_remote_code)
        return shape_from_config(config)
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        raise ConfigError(f"model.name: cannot read a model configuration from '{model_cfg.name}': "
                          f"{first_line(exc)}") from None


@dataclass(frozen=True)
class Setting:
    """The recipe keys the memory model reads (and the planner may change)."""

    batch_size: int
    grad_accum: int
    max_length: int
    dtype_bytes: int
    quantization: str
    double_quant: bool
    gradient_checkpointing: bool
    activation_offload: bool
    shared_prompt: bool
    lora_r: int
    lora_dropout: float
    optimizer: str
    eager_attention: bool

    @classmethod
    def of(cls, recipe) -> "Setting":
        t, m = recipe.train, recipe.model
        return cls(batch_size=t.batch_size, grad_accum=t.grad_accum, max_length=recipe.data.max_length,
                   dtype_bytes=_DTYPE_BYTES[m.dtype], quantization=m.quantization, double_quant=m.double_quant,
                   gradient_checkpointing=m.gradient_checkpointing, activation_offload=t.activation_offload,
                   shared_prompt=t.shared_prompt, lora_r=recipe.lora.r, lora_dropout=recipe.lora.dropout,
                   optimizer=t.optimizer, eager_attention=(m.attn_implementation == "eager"))


# Measured on a CPU (tests/test_plan.py): the structural count below overestimates the bytes autograd keeps by
# 18-19% in both fp32 and bf16, because some saved tensors share storage (views, in-place results).
SHARED_STORAGE = 0.85


def layer_activation_bytes(shape: Shape, e: int, lora_dropout: float = 0.0) -> float:
    """Bytes per token that one decoder layer (4-bit linears with LoRA) keeps for backward, without
    checkpointing; e: bytes per element of the compute dtype.

    Two RMSNorms (their normalised output, 2h); attention: q, k, v, the rotary outputs and rotate_half
    temporaries, k and v repeated to every head for SDPA, its output and the o_proj input (7q + 4kv); MLP:
    gate, up, activation, product (4I). peft keeps LoRA weights in fp32 and casts each LoRA input to fp32, a
    copy per adapted layer when the compute dtype is 16-bit (q, k, v, gate and up read the normed h, o reads q,
    down reads I); LoRA dropout keeps its output and mask."""
    h, i, q = shape.hidden, shape.intermediate, shape.heads * shape.head_dim
    kv = shape.kv_heads * shape.head_dim
    lora_inputs = 5 * h + q + i
    total = e * (2 * h + 7 * q + 4 * kv + 4 * i)
    if e != 4:
        total += 4 * lora_inputs
    if lora_dropout > 0:
        total += 5 * lora_inputs
    return SHARED_STORAGE * total


def estimate(shape: Shape, s: Setting) -> dict[str, int]:
    """Predicted bytes of each term of the peak (see the module docstring); their sum is the allocated peak."""
    e = s.dtype_bytes
    linear = shape.layers * sum(i * o for i, o in shape.linear_shapes)
    if s.quantization == "nf4":
        per_weight = 0.5 + (1 / 64 + 4 / (64 * 256) if s.double_quant else 4 / 64)
    else:
        per_weight = e
    lora = shape.layers * s.lora_r * sum(i + o for i, o in shape.linear_shapes)
    tokens = 2 * s.batch_size * s.max_length
    h, inter = shape.hidden, shape.intermediate
    layer = layer_activation_bytes(shape, e, s.lora_dropout)
    layer_grads = e * (2 * h + 2 * inter)  # gradients flowing through the layer being recomputed
    out = {
        "base weights": round(linear * per_weight),
        "embeddings and head": shape.vocab * h * e * (1 if shape.tied else 2),
        "adapter weights and grads": lora * 8,
        "optimizer states": lora * (2 if s.optimizer == "paged_adamw_8bit" else 8),
    }
    if s.gradient_checkpointing:
        out["checkpointed activations"] = 0 if s.activation_offload else shape.layers * tokens * h * e
        out["layer recompute"] = round(tokens * (layer + layer_grads))
    else:
        out["activations"] = 0 if s.activation_offload else round(shape.layers * tokens * layer)
        out["layer recompute"] = tokens * layer_grads
    if s.eager_attention:  # eager attention materialises scores and probabilities per head
        rows = s.batch_size if s.shared_prompt else 2 * s.batch_size
        width = 2 * s.max_length if s.shared_prompt else s.max_length
        out["attention scores"] = rows * shape.heads * width * width * e * 2
    # one chunk of fp32 logits, the exp() temporary of its log-softmax and, in backward, its gradient (3 x fp32),
    # plus the head's output in the compute dtype; a chunk never exceeds the budget, nor the batch's tokens
    logits = min(LOGITS_BUDGET_BYTES, tokens * shape.vocab * 4)
    out["log-prob head"] = round(logits * (3 + e / 4)) + tokens * h * e
    out["dequantised weight"] = 2 * max(i * o for i, o in shape.linear_shapes) * e if s.quantization == "nf4" else 0
    if s.shared_prompt:
        out["attention mask"] = s.batch_size * (2 * s.max_length) ** 2
    return out


def device_total(allocated: int) -> int:
    return int(allocated * (1 + ALLOCATOR_SLACK)) + CONTEXT_BYTES


def candidates(s: Setting):
    """Settings to try, fastest first: the recipe's max_length before shorter ones; its own options before
    gradient checkpointing, then activation offload; larger batches first (grad_accum raised so that each
    step keeps at least its pairs)."""
    pairs = s.batch_size * s.grad_accum
    lengths = [s.max_length] + [n for n in (s.max_length * 3 // 4, s.max_length // 2, s.max_length // 4) if n >= 64]
    batches = sorted({s.batch_size} | {b for b in (8, 4, 2, 1) if b < s.batch_size}, reverse=True)
    options = [(s.gradient_checkpointing, s.activation_offload)]
    options += [o for o in ((True, False), (True, True)) if o not in options and o >= options[0]]
    for length in lengths:
        for checkpointing, offload in options:
            for b in batches:
                yield replace(s, batch_size=b, grad_accum=math.ceil(pairs / b), max_length=length,
                              gradient_checkpointing=checkpointing, activation_offload=offload)


def propose(shape: Shape, s: Setting, budget: int) -> Setting | None:
    """The first candidate whose predicted device total fits `budget` bytes, or None."""
    for c in candidates(s):
        if device_total(sum(estimate(shape, c).values())) <= budget:
            return c
    return None


def overrides(before: Setting, after: Setting) -> list[str]:
    keys = [("batch_size", "train.batch_size"), ("grad_accum", "train.grad_accum"), ("max_length", "data.max_length"),
            ("activation_offload", "train.activation_offload"),
            ("gradient_checkpointing", "model.gradient_checkpointing")]
    out = []
    for attr, key in keys:
        a, b = getattr(before, attr), getattr(after, attr)
        if a != b:
            out.append(f"{key}={str(b).lower() if isinstance(b, bool) else b}")
    return out


_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(gib|gb|g|mib|mb|m)?\s*$", re.IGNORECASE)


def parse_memory(text: str) -> int:
    """'8GB', '8 GiB', '7.5g', '6144MB' -> bytes. GB and GiB both mean 2^30 bytes: an '8 GB' GPU has 8 GiB."""
    m = _MEMORY.match(text or "")
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"--gpu-memory: expected a size such as 8GB, 7.5GiB or 6144MB, got {text!r}")
    unit = (m.group(2) or "gb").lower()
    return int(float(m.group(1)) * (2**20 if unit.startswith("m") else GiB))


def plan(recipe, gpu_memory: int) -> dict:
    """The prediction for the recipe as written and the proposal (None when nothing fits)."""
    shape = load_shape(recipe.model)
    setting = Setting.of(recipe)
    terms = estimate(shape, setting)
    allocated = sum(terms.values())
    chosen = propose(shape, setting, gpu_memory)
    return {
        "shape": shape.__dict__, "gpu_memory": gpu_memory, "terms": terms, "allocated": allocated,
        "device_total": device_total(allocated), "fits": device_total(allocated) <= gpu_memory,
        "proposal": None if chosen is None else overrides(setting, chosen),
        "proposal_total": None if chosen is None else device_total(sum(estimate(shape, chosen).values())),
    }


def format_plan(result: dict, recipe_path: str) -> str:
    gb = lambda b: f"{b / GiB:6.2f} GiB"
    sh = result["shape"]
    lines = [f"model: {sh['layers']} layers, hidden {sh['hidden']}, vocab {sh['vocab']}; "
             f"GPU memory {result['gpu_memory'] / GiB:.2f} GiB",
             "predicted peak (torch.cuda.max_memory_allocated), the worst batch (every sequence at max_length):"]
    lines += [f"  {name:<28}{gb(v)}" for name, v in result["terms"].items()]
    lines += [f"  {'allocated peak':<28}{gb(result['allocated'])}",
              f"  {'+ CUDA context, slack':<28}{gb(result['device_total'] - result['allocated'])}",
              f"  {'device total':<28}{gb(result['device_total'])}  "
              f"{'fits' if result['fits'] else 'does not fit'}"]
    if result["proposal"] == []:
        lines.append("proposal: the recipe fits as it is")
    elif result["proposal"]:
        lines.append(f"proposal ({gb(result['proposal_total']).strip()} predicted): "
                     f"lora-dpo train {recipe_path} {' '.join(result['proposal'])}")
    lines.append("note: a model of memory, not a measurement: within 7% of the measured peak for an 8B model at fixed lengths "
                 "(benchmarks/RESULTS.md); it sizes every sequence at max_length, so shorter data peaks lower")
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="predict a recipe's peak GPU memory and propose batch, length and options that fit",
                       description="Predict peak GPU memory from the model's configuration and the recipe (no "
                                   "weights are loaded); propose train.batch_size, data.max_length and options "
                                   "that fit --gpu-memory.")
    p.add_argument("recipe", help="path to a YAML recipe")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. data.max_length=2048")
    p.add_argument("--gpu-memory", required=True, metavar="SIZE", help="the GPU's memory, e.g. 8GB, 24GiB, 6144MB")
    p.add_argument("--json", action="store_true", help="print the prediction as JSON")


def run(args: argparse.Namespace) -> int:
    from .config import load_recipe

    budget = parse_memory(args.gpu_memory)
    recipe = load_recipe(args.recipe, args.overrides)
    result = plan(recipe, budget)
    print(json.dumps(result, indent=2) if args.json else format_plan(result, args.recipe))
    if result["proposal"] is None:
        raise ConfigError(f"--gpu-memory: nothing fits in {budget / GiB:.2f} GiB, even at batch 1 with activation "
                          f"offload and max_length {max(64, recipe.data.max_length // 4)}; a smaller model or "
                          "a larger GPU is needed")
    return 0
