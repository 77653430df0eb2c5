"""The memory model: a recipe's peak GPU memory predicted from the model's shape, and settings that fit a budget.

`lora-dpo plan` (cli/plan.py) and `model.gradient_checkpointing: auto` (model/checkpointing.py) ask it. The
prediction is a memory model built from the model's configuration (AutoConfig: a Hub id or a local
folder; no weights are read), the recipe and the lengths of its training pairs (tokenised as `train` would; or
every sequence at max_length with `--lengths max`, or when the data cannot be read). Its terms, in bytes (s:
bytes per element of the compute dtype; tokens: rows x width of the worst batch, the batch_size widest pairs):

    base weights       linear layers in 4-bit NF4: 0.5 byte per weight plus the quantisation state
                       (an 8-bit absmax per 64 weights and an fp32 one per 256 blocks with double quantisation,
                       an fp32 absmax per 64 without); 16-bit (s) without quantisation
    embeddings, head   vocab x hidden x s each (one when tied, or with the table in CPU memory); bitsandbytes
                       keeps them in 16 bits
    adapter            LoRA weights and gradients in fp32 (peft upcasts them), 8 bytes per parameter
    optimizer          AdamW: two fp32 moments (8 bytes per parameter); paged 8-bit AdamW: 2
    checkpointed acts  checkpointed layers x tokens x hidden x s: each such layer's input, kept for backward
                       (0 when offloaded)
    activations        the other layers x tokens x what one layer keeps for backward (layer_activation_parts)
    layer recompute    tokens x (one layer's saved activations + its gradients): backward recomputes one
                       layer at a time; a tiled MLP holds one slice of its intermediates
    log-prob head      4 x one chunk of float32 logits (core/logps.LOGITS_BUDGET_BYTES, whatever the vocabulary): the
                       logits, the exp() temporary of the log-softmax, its gradient, the 16-bit head output and
                       its gradient; the gathered completion hidden states
    dequantised weight the largest linear layer in s, twice (forward and backward), made per matmul
    attention mask     shared-prompt rows only: rows x width^2 booleans
    reference pass     a forward without gradients over eval.batch_size pairs (the reference pre-pass and
                       every evaluation): one layer's working set, or two chunks of logits at the head

The head's chunks and the decoder's backward never hold their transients at once, so a step counts the larger
of the two phases (PHASES) on top of what it keeps for backward; a no-grad pass keeps nothing for backward, so
the peak is the weights, adapter and optimizer plus the larger of a step and a no-grad pass (`peak_of`). `allocated` is what
`torch.cuda.max_memory_allocated` would report; the device total adds the CUDA context and
the caching allocator's slack (CONTEXT_BYTES, ALLOCATOR_SLACK). Every term is a formula here, not a
measurement; benchmarks/RESULTS.md and tests/memory/test_plan.py hold its checks against measured peaks.
"""

from __future__ import annotations

import heapq
import math
import re
from dataclasses import dataclass, replace

from ..core.logps import LOGITS_BUDGET_BYTES
from ..errors import ConfigError

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


@dataclass(frozen=True)
class Setting:
    """The recipe keys the memory model reads (and the planner may change), and the data's pair widths."""

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
    autocast: bool = True  # 16-bit autocast (what a GPU recipe runs with): peft then makes no fp32 input copies
    embeddings_on_cpu: bool = False
    mlp_chunks: int = 1
    eval_batch: int = 8  # pairs per no-grad forward: the reference pass and evaluation (eval.batch_size)
    checkpointed: int | None = None  # layers checkpointed when gradient_checkpointing (None: every one)
    auto_checkpointing: bool = False  # model.gradient_checkpointing: auto (the fewest layers that fit; model/checkpointing.py)
    # (plain width, shared width, completion tokens) of each training pair after truncation: prompt + the longer
    # reply, prompt + both replies, both replies; None: every sequence at max_length (no data, or data not read)
    widths: tuple[tuple[int, int, int], ...] | None = None

    @classmethod
    def of(cls, recipe, widths=None, shared: bool = False) -> "Setting":
        """The setting of a recipe; `widths`: its pairs' (Setting.widths), `shared`: its layout (model/layout.py
        decides it; the memory model only counts it)."""
        t, m = recipe.train, recipe.model
        autocast = t.mixed_precision in ("bf16", "fp16") or (t.mixed_precision == "auto" and m.dtype != "fp32")
        return cls(batch_size=t.batch_size, grad_accum=t.grad_accum, max_length=recipe.data.max_length,
                   dtype_bytes=_DTYPE_BYTES[m.dtype], quantization=m.quantization, double_quant=m.double_quant,
                   gradient_checkpointing=m.gradient_checkpointing is not False,
                   auto_checkpointing=m.gradient_checkpointing == "auto", activation_offload=t.activation_offload,
                   shared_prompt=shared, lora_r=recipe.lora.r, lora_dropout=recipe.lora.dropout,
                   optimizer=t.optimizer, eager_attention=(m.attn_implementation == "eager"), autocast=autocast,
                   embeddings_on_cpu=t.embeddings_on_cpu, mlp_chunks=t.mlp_chunks, eval_batch=recipe.eval.batch_size,
                   widths=None if widths is None else tuple(widths))


def worst_batch(s: Setting, pairs: int | None = None) -> tuple[int, int, int]:
    """(rows, width, completion tokens) of the largest batch: the batch_size widest pairs together (length
    grouping puts them in one step; a shuffled order may). Two rows per pair, each prompt + the longer reply
    (plain), or one row per pair, [prompt | chosen | rejected] (shared). Without data every sequence is
    max_length tokens, all of them scored; a max_length below the data's (a proposal) caps each sequence.
    `pairs`: pairs per batch (default: train.batch_size)."""
    pairs = pairs or s.batch_size
    rows = pairs if s.shared_prompt else 2 * pairs
    cap = 2 * s.max_length if s.shared_prompt else s.max_length
    if not s.widths:
        return rows, cap, rows * cap
    widest = heapq.nlargest(pairs, s.widths, key=lambda w: w[1] if s.shared_prompt else w[0])  # (stable, as sorted)
    width = min(cap, widest[0][1] if s.shared_prompt else widest[0][0])
    return rows, width, min(rows * width, sum(w[2] for w in widest))


# Measured on a CPU (tests/memory/test_plan.py): the structural count below overestimates the bytes autograd keeps by
# 18-19% in both fp32 and bf16, because some saved tensors share storage (views, in-place results).
SHARED_STORAGE = 0.85


def layer_activation_parts(shape: Shape, e: int, lora_dropout: float = 0.0, autocast: bool = False) -> tuple[float, float]:
    """(attention part, MLP part) of the bytes per token that one decoder layer (4-bit linears with LoRA) keeps
    for backward, without checkpointing; e: bytes per element of the compute dtype.

    Two RMSNorms (their normalised output, 2h); attention: q, k, v, the rotary outputs and rotate_half
    temporaries, k and v repeated to every head for SDPA, its output and the o_proj input (7q + 4kv); MLP:
    gate, up, activation, product (4I). peft keeps LoRA weights in fp32 and, outside autocast, casts each LoRA
    input to fp32: a copy per adapted layer when the compute dtype is 16-bit (q, k, v, gate and up read the
    normed h, o reads q, down reads I); LoRA dropout keeps its output and mask."""
    h, i, q = shape.hidden, shape.intermediate, shape.heads * shape.head_dim
    kv = shape.kv_heads * shape.head_dim
    attn_inputs, mlp_inputs = 3 * h + q, 2 * h + i
    attn, mlp = e * (2 * h + 7 * q + 4 * kv), e * 4 * i
    dropout = (5 * attn_inputs, 5 * mlp_inputs) if lora_dropout > 0 else (0, 0)
    if autocast and e != 4:
        # measured under autocast (tests/memory/test_plan.py): no storage is shared, and both RMSNorms keep their
        # input in fp32 (8h)
        return attn + 8 * h + dropout[0], mlp + dropout[1]
    if e != 4:
        attn, mlp = attn + 4 * attn_inputs, mlp + 4 * mlp_inputs
    return SHARED_STORAGE * (attn + dropout[0]), SHARED_STORAGE * (mlp + dropout[1])


def layer_activation_bytes(shape: Shape, e: int, lora_dropout: float = 0.0, autocast: bool = False) -> float:
    """Bytes per token one decoder layer keeps for backward, without checkpointing (layer_activation_parts)."""
    return sum(layer_activation_parts(shape, e, lora_dropout, autocast))


def estimate(shape: Shape, s: Setting) -> dict[str, int]:
    """Predicted bytes of each term of the peak (see the module docstring); their sum is the allocated peak."""
    e = s.dtype_bytes
    linear = shape.layers * sum(i * o for i, o in shape.linear_shapes)
    if s.quantization == "nf4":
        per_weight = 0.5 + (1 / 64 + 4 / (64 * 256) if s.double_quant else 4 / 64)
    else:
        per_weight = e
    lora = shape.layers * s.lora_r * sum(i + o for i, o in shape.linear_shapes)
    rows, width, scored = worst_batch(s)
    tokens = rows * width
    h, inter = shape.hidden, shape.intermediate
    attn, mlp = layer_activation_parts(shape, e, s.lora_dropout, s.autocast)
    # a tiled MLP keeps only its slices' inputs (views) for backward and holds one slice's intermediates at a time
    chunks = max(1, s.mlp_chunks)
    held_mlp, slice_mlp = (mlp, 0.0) if chunks == 1 else (0.0, mlp / chunks)
    layer_grads = e * (2 * h + 2 * inter / chunks)  # gradients flowing through the layer being recomputed
    tables = 1 if shape.tied or s.embeddings_on_cpu else 2  # a tied table is the head's: it stays on the device
    out = {
        "base weights": round(linear * per_weight),
        "embeddings and head": shape.vocab * h * e * tables,
        "adapter weights and grads": lora * 8,
        "optimizer states": lora * (2 if s.optimizer == "paged_adamw_8bit" else 8),
    }
    k = checkpointed_layers(shape, s)
    if k:
        out["checkpointed activations"] = 0 if s.activation_offload else k * tokens * h * e
    if k < shape.layers:
        out["activations"] = 0 if s.activation_offload else round((shape.layers - k) * tokens * (attn + held_mlp))
    # backward recomputes a checkpointed layer whole, one at a time; through the others only gradients flow
    out["layer recompute"] = round(tokens * ((attn + held_mlp if k else 0) + slice_mlp + layer_grads))
    if s.eager_attention:  # eager attention materialises scores and probabilities per head
        out["attention scores"] = rows * shape.heads * width * width * e * 2
    # one chunk of fp32 logits at its peak, measured 4x the chunk's fp32 logits in fp32 and in bf16 (the logits, the
    # exp() temporary of the log-softmax, its gradient, and in 16 bits the head's output and its gradient); a
    # chunk never exceeds the budget, nor the batch's scored (completion) tokens; and the hidden states gathered
    # at those tokens
    logits = min(LOGITS_BUDGET_BYTES, scored * shape.vocab * 4)
    out["log-prob head"] = round(logits * 4) + scored * h * e
    out["dequantised weight"] = 2 * max(i * o for i, o in shape.linear_shapes) * e if s.quantization == "nf4" else 0
    if s.shared_prompt:
        out["attention mask"] = rows * width * width
    out["reference pass"] = no_grad_pass_bytes(shape, s)
    return out


def checkpointed_layers(shape: Shape, s: Setting) -> int:
    if not s.gradient_checkpointing:
        return 0
    return shape.layers if s.checkpointed is None else min(s.checkpointed, shape.layers)


def fewest_checkpointed(shape: Shape, s: Setting, budget: int) -> int | None:
    """The fewest layers to checkpoint (0 to all) whose predicted allocated peak is within `budget` bytes, or
    None when even every layer is over. None at all is tried first: from one layer on the peak only falls as
    layers are added (each trades its activations for its input), so a bisection finds the first that fits, the
    fastest; but the first adds the recompute's transient, which may outweigh the one layer it frees."""
    fits = lambda k: peak_of(estimate(shape, replace(s, gradient_checkpointing=k > 0, checkpointed=k))) <= budget
    if fits(0):
        return 0
    if not fits(shape.layers):
        return None
    lo, hi = 1, shape.layers  # fits(hi) holds
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid + 1, hi)
    return hi


def no_grad_pass_bytes(shape: Shape, s: Setting) -> int:
    """The transient of a forward without gradients over eval.batch_size pairs (the reference pass, each
    evaluation): at the MLP, its three intermediates (the activation, the up projection and their product; a
    tiled MLP one slice of them) beside the residual stream and its normed copy, with the RMSNorm's fp32
    temporaries about four hidden-wide tensors in all, and the largest dequantised weight; at the head, two
    chunks of fp32 logits (the logits and the exp() of the log-softmax). A GPU's attention kernels keep no
    [tokens x tokens] scores; a CPU's SDPA with a mask does, so on a CPU this term is low (there a training
    step sets the peak). The one GPU check so far: benchmarks/RESULTS.md, mem-8b."""
    e = s.dtype_bytes
    rows, width, scored = worst_batch(s, s.eval_batch)
    tokens = rows * width
    h = shape.hidden
    hidden_wide = 4 * h * e
    decoder = tokens * (hidden_wide + 3 * shape.intermediate * e / max(1, s.mlp_chunks))
    if s.quantization == "nf4":
        decoder += max(i * o for i, o in shape.linear_shapes) * e
    head = 2 * min(LOGITS_BUDGET_BYTES, scored * shape.vocab * 4) + (tokens + scored) * h * e
    mask = rows * width * width if s.shared_prompt else 0
    return round(max(decoder, head) + mask)


# Transients that never coexist: the output head's chunks run and free before backward reaches the decoder, whose
# layers are then recomputed one at a time; a training step holds the larger of the two phases on top of what it
# keeps for backward (STEP). A forward without gradients (the reference pass, evaluation) holds none of those.
PHASES = ({"log-prob head"}, {"layer recompute", "dequantised weight", "attention scores"})
STEP = {"checkpointed activations", "activations", "attention mask"}
NO_GRAD = "reference pass"


def peak_of(terms: dict[str, int]) -> int:
    """The allocated peak of an `estimate`: the weights, adapter and optimizer, plus the larger of a training
    step (what it keeps for backward and its larger phase) and a no-grad pass."""
    phased = set().union(*PHASES) | STEP | {NO_GRAD}
    step = sum(terms.get(k, 0) for k in STEP) + max(sum(terms.get(k, 0) for k in phase) for phase in PHASES)
    return sum(v for k, v in terms.items() if k not in phased) + max(step, terms.get(NO_GRAD, 0))


def device_total(allocated: int) -> int:
    return int(allocated * (1 + ALLOCATOR_SLACK)) + CONTEXT_BYTES


# Memory levers in the order the planner reaches for them, cheapest in time first: the embedding table in CPU
# memory (a copy of [tokens, hidden] per step), gradient checkpointing (one more forward), a tiled MLP (one more
# MLP forward), activation offload (two PCIe copies of every checkpoint). Each adds to the ones before it.
LEVERS = ({"embeddings_on_cpu": True},
          {"gradient_checkpointing": True, "checkpointed": None, "auto_checkpointing": False},  # every layer
          {"mlp_chunks": 4}, {"activation_offload": True})


def candidates(s: Setting, tied: bool = False):
    """Settings to try, fastest first: the recipe's max_length before shorter ones; its own options before
    the levers (LEVERS, one more at a time); larger batches first (grad_accum raised so that each step keeps
    at least its pairs)."""
    pairs = s.batch_size * s.grad_accum
    lengths = [s.max_length] + [n for n in (s.max_length * 3 // 4, s.max_length // 2, s.max_length // 4) if n >= 64]
    batches = sorted({s.batch_size} | {b for b in (8, 4, 2, 1) if b < s.batch_size}, reverse=True)
    options, current = [s], s
    for lever in LEVERS:
        if tied and "embeddings_on_cpu" in lever:  # the head shares the table: it stays on the device anyway
            continue
        # never undo what the recipe has (a lever's True or count); None and False are set as they are
        lever = {k: v if v is None or v is False else max(v, getattr(current, k)) for k, v in lever.items()}
        nxt = replace(current, **lever)
        if nxt != current:
            options.append(nxt)
            current = nxt
    for length in lengths:
        for option in options:
            for b in batches:
                yield replace(option, batch_size=b, grad_accum=math.ceil(pairs / b), max_length=length)


def propose(shape: Shape, s: Setting, budget: int) -> Setting | None:
    """The first candidate whose predicted device total fits `budget` bytes, or None. A candidate whose no-grad
    pass alone is over gets a smaller eval.batch_size first (down to its train batch): that pass is a small
    share of a run's time."""
    for c in candidates(s, shape.tied):
        for eval_batch in sorted({c.eval_batch} | {b for b in (4, 2, 1) if c.batch_size <= b < c.eval_batch},
                                 reverse=True):
            option = replace(c, eval_batch=eval_batch)
            if device_total(peak_of(estimate(shape, option))) <= budget:
                return option
    return None


def checkpointing(s: Setting):
    """What a setting's checkpointing means: auto (it is resolved per device), or on every layer, or off."""
    return "auto" if s.auto_checkpointing else s.gradient_checkpointing


def overrides(before: Setting, after: Setting) -> list[str]:
    keys = [("batch_size", "train.batch_size"), ("grad_accum", "train.grad_accum"), ("max_length", "data.max_length"),
            ("embeddings_on_cpu", "train.embeddings_on_cpu"),
            ("mlp_chunks", "train.mlp_chunks"), ("activation_offload", "train.activation_offload"),
            ("eval_batch", "eval.batch_size")]
    out = []
    if checkpointing(before) != checkpointing(after):
        out.append(f"model.gradient_checkpointing={'auto' if after.auto_checkpointing else str(after.gradient_checkpointing).lower()}")
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
