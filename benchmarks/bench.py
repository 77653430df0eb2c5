"""lora-dpo against TRL's DPOTrainer on the same work, side by side, in one run.

    python benchmarks/bench.py --workload cpu            # the issue's CPU workload (tiny 8-layer Llama)
    python benchmarks/bench.py --workload gpu-1b         # Llama-3.2-1B architecture, random weights (GPU)
    python benchmarks/bench.py --workload gpu-8b         # Llama-3.1-8B architecture, random weights (GPU)
    python benchmarks/bench.py --workload mem-8b --only shared+grouped trl      # 8B, pairs of 2 x 2048: peak memory
    python benchmarks/bench.py --workload mem-qwen-0.5b --only shared+grouped trl  # Qwen2.5-0.5B, 2 x 4096

Nothing is downloaded: each model is built with random weights from its published configuration (the numbers
are written below), with a word-level tokenizer of the same vocabulary size, and saved to a folder that every
contestant loads through `from_pretrained`, in 4-bit NF4. The data are synthetic pairs of the workload's
lengths, written once to a jsonl file of prompt/chosen/rejected strings (one word = one token, so the lengths
are exact). Each contestant runs in its own subprocess (a fresh peak RSS on the CPU, a fresh
`torch.cuda.max_memory_allocated` on a GPU), with the same seed, LoRA (r 16, alpha 32, dropout 0, all linear
layers), batch, gradient checkpointing and lengths, for one epoch.

Timing covers the optimizer steps only (model loading and tokenisation excluded). lora-dpo computes the
reference log-probs in a pass before its steps; TRL (by default) inside every step: the table shows lora-dpo's
pairs/s without and with ("+ref") that pre-pass, and TRL with `precompute_ref_log_probs=True` likewise.
Benchmarks are not tests; results go to benchmarks/RESULTS.md by hand, with date, device and versions.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# --------------------------------------------------------------------------------------------- the models
# Published configurations (config.json of each Hub repository), written out so that nothing is downloaded.
ARCHS = {
    # the CPU model: a tiny Llama, 8 layers, hidden 512, vocab 8000
    "tiny-llama-8l": dict(arch="llama", vocab_size=8000, hidden_size=512, intermediate_size=1536,
                          num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                          max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5,
                          tie_word_embeddings=False),
    # meta-llama/Llama-3.2-1B
    "llama-3.2-1b": dict(arch="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=True,
                         rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=8192)),
    # meta-llama/Llama-3.1-8B
    "llama-3.1-8b": dict(arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=False,
                         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=8192)),
    # Qwen/Qwen2.5-0.5B
    "qwen2.5-0.5b": dict(arch="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=True),
    # Qwen/Qwen2.5-0.5B's dimensions on the Llama architecture (no q/k/v biases, 0.1% of its weights): transformers
    # 5.23 loads a Qwen2Tokenizer for any `qwen2` folder, which reads the word-level vocabulary as no tokens
    "qwen2.5-0.5b-as-llama": dict(arch="llama", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                  num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                  max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                  tie_word_embeddings=True),
}

# model, pairs, prompt tokens [lo, hi], completion tokens [lo, hi] (EOS included), batch, compute dtype
WORKLOADS = {
    "cpu": dict(model="tiny-llama-8l", pairs=64, prompt=(48, 80), completion=(48, 128), batch=4, dtype="fp32"),
    # the CPU model on 8-16-token texts: the step's fixed cost (Python, dispatch, one call per kernel) dominates,
    # as on a GPU whose kernels finish faster than Python issues them (the 1B workload on an H100)
    "overhead": dict(model="tiny-llama-8l", pairs=64, prompt=(8, 16), completion=(8, 16), batch=4, dtype="fp32"),
    "gpu-1b": dict(model="llama-3.2-1b", pairs=128, prompt=(128, 512), completion=(128, 512), batch=4, dtype="bf16"),
    "gpu-8b": dict(model="llama-3.1-8b", pairs=64, prompt=(128, 512), completion=(128, 512), batch=2, dtype="bf16"),
    # the memory targets: 8B with pairs of 2 x 2048 tokens in 8 GB; Qwen2.5-0.5B with 2 x 4096 in 4 GB
    "mem-8b": dict(model="llama-3.1-8b", pairs=8, prompt=(1024, 1024), completion=(1024, 1024), batch=1, dtype="bf16"),
    "mem-qwen-0.5b": dict(model="qwen2.5-0.5b", pairs=8, prompt=(2048, 2048), completion=(2048, 2048), batch=1,
                          dtype="bf16"),
    "mem-qwen-0.5b-as-llama": dict(model="qwen2.5-0.5b-as-llama", pairs=8, prompt=(2048, 2048),
                                   completion=(2048, 2048), batch=1, dtype="bf16"),
}

SEED = 42
LORA = dict(r=16, alpha=32, dropout=0.0)  # on every linear layer but the output head
LR = 5e-5

# lora-dpo variants: recipe overrides on top of the common recipe (one lever on or off at a time). The common
# recipe turns the on-disk reference cache off, so that "+ref" always pays for computing the reference.
LORA_DPO_VARIANTS = {
    "lora-dpo": [],  # the defaults: reference pre-pass, chunked log-probs, shared-prompt rows where exact (auto)
    "plain": ["train.shared_prompt=false"],  # [prompt+chosen; prompt+rejected]: the defaults before shared prompts
    # each lever on its own, on top of the plain layout
    "shared": ["train.shared_prompt=true"],
    "grouped": ["train.shared_prompt=false", "train.group_by_length=true"],
    "shared+grouped": ["train.shared_prompt=true", "train.group_by_length=true"],
    "offload": ["train.shared_prompt=false", "train.activation_offload=true"],  # moves saved activations to the CPU: a GPU lever
    "tiled": ["train.shared_prompt=false", "train.mlp_chunks=4"],  # each MLP over 4 slices of tokens: a lower backward peak, one more MLP forward
    # the library's default checkpointing (auto: the fewest layers that fit the free memory; the workloads name
    # TRL's setting, every layer checkpointed, which the rows above keep)
    "auto-ckpt": ["model.gradient_checkpointing=auto"],
    "shared+grouped+auto-ckpt": ["train.shared_prompt=true", "train.group_by_length=true",
                                 "model.gradient_checkpointing=auto"],
    # every memory lever at once, what `lora-dpo plan` reaches for on the smallest GPUs
    "lean": ["train.shared_prompt=true", "train.group_by_length=true", "train.embeddings_on_cpu=true",
             "train.mlp_chunks=4", "train.activation_offload=true"],
}
DEFAULT_VARIANTS = ("lora-dpo", "shared+grouped", "auto-ckpt")  # defaults, the kept levers, auto checkpointing; --levers: all


def build_tokenizer(vocab_size: int):
    """A word-level tokenizer of `vocab_size` tokens: `w0 w1 ...` are one token each, so lengths are exact."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for i in range(vocab_size - len(specials)):
        vocab[f"w{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def build_model_folder(name: str, folder: Path) -> Path:
    """Save architecture `name` with random weights (and its tokenizer) to `folder`, once."""
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    spec = dict(ARCHS[name])
    arch = spec.pop("arch")
    cfg_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    tok = build_tokenizer(spec["vocab_size"])
    cfg = cfg_cls(**spec, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    torch.manual_seed(SEED)
    big = spec["hidden_size"] >= 1024
    # large models: built in bf16 (on the GPU when there is one, which initialises them in seconds)
    device = "cuda" if big and torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if big else torch.float32
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: an 8B model in fp32 would need 32 GB first
    try:
        with torch.device(device):
            model = model_cls(cfg)
    finally:
        torch.set_default_dtype(default)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def build_data(w: dict, vocab_size: int, path: Path) -> Path:
    """`w["pairs"]` synthetic pairs; word counts drawn uniformly from the workload's ranges (EOS counted)."""
    rng = random.Random(SEED)
    words = lambda n: " ".join(f"w{rng.randrange(vocab_size - 3)}" for _ in range(n))
    with open(path, "w") as f:
        for _ in range(w["pairs"]):
            p = rng.randint(*w["prompt"])
            c, r = rng.randint(*w["completion"]) - 1, rng.randint(*w["completion"]) - 1
            f.write(json.dumps({"prompt": words(p), "chosen": " " + words(c), "rejected": " " + words(r)}) + "\n")
    return path


def data_tokens(path: Path) -> tuple[int, int]:
    """(pairs, tokens): tokens of a pair = prompt + chosen + prompt + rejected, EOS included (what a plain
    concatenated forward processes without padding)."""
    pairs = tokens = 0
    for line in open(path):
        row = json.loads(line)
        p, c, r = (len(row[k].split()) for k in ("prompt", "chosen", "rejected"))
        pairs += 1
        tokens += 2 * p + c + r + 2
    return pairs, tokens


# ------------------------------------------------------------------------------------------- contestants


def _peak_memory_gb() -> float:
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def run_lora_dpo(job: dict) -> dict:
    import lora_dpo.toy  # noqa: F401 - registers `toy`, as the CLI does
    from lora_dpo.config import load_recipe
    from lora_dpo.run.metrics import read_metrics
    from lora_dpo.training import loop, setup

    w = job["workload"]
    steps = w["pairs"] // w["batch"]
    max_len = w["prompt"][1] + w["completion"][1]
    base = {
        "output_dir": job["out"], "overwrite": True,
        "model": {"name": job["model"], "quantization": "nf4", "dtype": w["dtype"], "gradient_checkpointing": True},
        "lora": {"r": LORA["r"], "alpha": LORA["alpha"], "dropout": LORA["dropout"], "target_modules": "all-linear"},
        "data": {"train": job["data"], "eval_fraction": 0.0, "max_length": max_len,
                 "max_prompt_length": w["prompt"][1]},
        "loss": {"name": "dpo", "beta": 0.1},
        "train": {"epochs": 1, "batch_size": w["batch"], "grad_accum": 1, "lr": LR, "warmup_ratio": 0.0,
                  "scheduler": "constant", "seed": SEED, "log_every": steps, "save_every": None, "keep_last": 1,
                  "reference_cache": None},
        "eval": {"scorer": None, "num_prompts": 0},
    }
    recipe = load_recipe(None, job["overrides"], base=base)
    load = setup.load_policy

    def marked_load(*args, **kwargs):  # the memory phases: loading the model, then training
        model = load(*args, **kwargs)
        MEMORY.mark("train")
        return model

    setup.load_policy = marked_load
    ref_s = [0.0]
    compute = loop.reference_tables  # the reference pre-pass (eval_fraction 0: the training table only)

    def timed_reference(*args, **kwargs):
        start = time.perf_counter()
        try:
            return compute(*args, **kwargs)
        finally:
            ref_s[0] += time.perf_counter() - start

    loop.reference_tables = timed_reference
    loop.train(recipe)
    row = [r for r in read_metrics(Path(job["out"]) / "metrics.jsonl") if r["split"] == "train"][-1]
    train_s = w["pairs"] / row["pairs_per_s"]  # one window over every step: optimizer steps only
    out = {"train_s": train_s, "ref_s": ref_s[0], "loss": row["loss"], "peak_gb": _peak_memory_gb()}
    from lora_dpo.cli.plan import plan

    out["plan_gb"] = plan(recipe, 80 * 2**30)["allocated"] / 1e9  # what `lora-dpo plan` predicts for training
    return out


def run_trl(job: dict) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from lora_dpo.model.load import disable_cpu_repacking

    w = job["workload"]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[w["dtype"]]
    cuda = torch.cuda.is_available()
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=dtype, quantization_config=quant,
                                                 device_map={"": 0} if cuda else None)
    # the same guard lora-dpo applies: without it, bitsandbytes 0.50 on AVX512-BF16 CPUs silently zeroes the
    # input gradients of a 4-bit layer after its first no-grad eval forward (see lora_dpo/model/load.py)
    disable_cpu_repacking(model)
    MEMORY.mark("train")
    tok = AutoTokenizer.from_pretrained(job["model"])
    data = load_dataset("json", data_files=job["data"], split="train")
    precompute = job["contestant"] == "trl-precompute"
    args = DPOConfig(
        output_dir=job["out"], per_device_train_batch_size=w["batch"], gradient_accumulation_steps=1,
        num_train_epochs=1, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, beta=0.1,
        max_length=w["prompt"][1] + w["completion"][1], gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, bf16=w["dtype"] == "bf16" and cuda,
        fp16=w["dtype"] == "fp16" and cuda, use_cpu=not cuda, seed=SEED, data_seed=SEED, logging_steps=10**6,
        save_strategy="no", report_to=[], dataloader_num_workers=0, precompute_ref_log_probs=precompute,
        max_grad_norm=1.0, optim="adamw_torch", disable_tqdm=True,
    )
    peft_cfg = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                          target_modules="all-linear", task_type="CAUSAL_LM")
    ref_s = [0.0]
    original = DPOTrainer._precompute_ref_logps

    def timed_precompute(self, *a, **k):
        start = time.perf_counter()
        try:
            return original(self, *a, **k)
        finally:
            ref_s[0] += time.perf_counter() - start

    DPOTrainer._precompute_ref_logps = timed_precompute
    clock = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            clock["start"] = time.perf_counter()

        def on_train_end(self, *a, **k):
            clock["end"] = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **k):
            if logs and "loss" in logs:
                clock["loss"] = logs["loss"]

    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=peft_cfg,
                         callbacks=[Clock()])
    out = trainer.train()
    return {"train_s": clock["end"] - clock["start"], "ref_s": ref_s[0], "loss": out.training_loss,
            "peak_gb": _peak_memory_gb()}


class _NoMemory:
    def mark(self, name: str) -> None:
        pass


MEMORY = _NoMemory()  # the run's memtrack.Peak when it measures tensor memory


def run_job(job_file: str) -> None:
    """Child process: run one contestant, write its result as JSON. With job["memory"], under memtrack: peak
    tensor memory of the whole run and of its phases (loading the model; training, the reference pass included)."""
    global MEMORY
    job = json.loads(Path(job_file).read_text())
    import torch

    from lora_dpo.memory.track import peak_memory

    fn = run_trl if job["contestant"].startswith("trl") else run_lora_dpo
    if not job.get("memory"):
        result = fn(job)
    else:
        with peak_memory("cuda" if torch.cuda.is_available() else "cpu") as MEMORY:
            result = fn(job)
        result.update(tensor_peak_gb=MEMORY.bytes / 1e9, load_peak_gb=MEMORY.phases.get("start", 0) / 1e9,
                      train_peak_gb=MEMORY.phases.get("train", 0) / 1e9)
    Path(job["result"]).write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------------ driver


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "trl"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def device_name() -> str:
    import platform

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="cpu")
    ap.add_argument("--only", nargs="*", help="contestants to run, any variant among them (default: the default "
                    "variants and TRL); e.g. lora-dpo lean trl")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VALUE[,KEY=VALUE]",
                    help="an extra lora-dpo variant with recipe overrides, e.g. 'grouped=train.group_by_length=true'")
    ap.add_argument("--levers", action="store_true", help="run every lora-dpo variant (each lever on its own)")
    ap.add_argument("--threads", type=int, help="torch/OpenMP threads per contestant (default: torch's default); "
                    "1 gives steadier figures on a busy machine")
    ap.add_argument("--repeats", type=int, default=1,
                    help="rounds of one run per contestant (interleaved); each contestant's fastest is reported")
    ap.add_argument("--no-tensor-memory", action="store_true",
                    help="on a CPU, skip the second run per contestant that measures peak tensor memory under the "
                         "profiler (memtrack; it slows a run, so speed is timed in a run without it)")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "lora-dpo-bench"))
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--_job", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._job:
        run_job(args._job)
        return 0

    w = WORKLOADS[args.workload]
    work = Path(args.workdir)
    model_dir = build_model_folder(w["model"], work / "models" / w["model"])
    data = build_data(w, ARCHS[w["model"]]["vocab_size"], work / f"data-{args.workload}.jsonl")
    n_pairs, n_tokens = data_tokens(data)
    variants = {k: v for k, v in LORA_DPO_VARIANTS.items() if args.levers or args.only or k in DEFAULT_VARIANTS}
    for spec in args.variant:
        name, _, overrides = spec.partition("=")
        variants[name] = [o for o in overrides.split(",") if o]
    contestants = list(variants) + ["trl", "trl-precompute"]
    if args.only:
        contestants = [c for c in contestants if c in args.only]
    print(f"workload {args.workload}: {w['model']}, {n_pairs} pairs, {n_tokens / n_pairs:.0f} tokens per pair, "
          f"batch {w['batch']}, on {device_name()}", file=sys.stderr)

    import torch

    cuda = torch.cuda.is_available()
    results, failed = {}, set()
    # Rounds of one run per contestant, not each contestant's runs back to back: a machine whose speed drifts
    # (a shared host) then drifts under every contestant alike, and the fastest of each contestant's runs is kept.
    # On a GPU the allocator counts memory for free; on a CPU the profiler does, in a last round of its own.
    jobs = [(name, cuda) for _ in range(args.repeats) for name in contestants]
    if not cuda and not args.no_tensor_memory:
        jobs += [(name, True) for name in contestants]
    for rep, (name, memory) in enumerate(jobs):
        if name in failed:
            continue
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            job = {"contestant": name, "workload": w, "model": str(model_dir), "data": str(data),
                   "overrides": variants.get(name, []), "out": str(Path(tmp) / "run"),
                   "result": str(Path(tmp) / "result.json"), "memory": memory}
            (Path(tmp) / "job.json").write_text(json.dumps(job))
            # a fresh datasets cache per run: TRL caches precomputed reference log-probs there
            env = {**os.environ, "HF_DATASETS_CACHE": str(Path(tmp) / "hf-datasets"), "TQDM_DISABLE": "1",
                   "HF_HUB_OFFLINE": "1"}
            if args.threads:
                env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--_job", str(Path(tmp) / "job.json")], env=env,
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{name}: failed\n{proc.stderr[-4000:]}", file=sys.stderr)
                failed.add(name)
                continue
            r = json.loads((Path(tmp) / "result.json").read_text())
        r["wall_s"] = time.perf_counter() - t0
        plan_note = f" (lora-dpo plan predicted {r['plan_gb']:.2f} GB)" if "plan_gb" in r else ""
        tensors = f", tensors: load {r['load_peak_gb']:.3f} GB, training {r['train_peak_gb']:.3f} GB" if memory else ""
        print(f"  {name} job {rep + 1}/{len(jobs)}{' (memory)' if memory and not cuda else ''}: train "
              f"{r['train_s']:.1f}s, reference {r['ref_s']:.1f}s, peak {r['peak_gb']:.2f} GB{tensors}{plan_note}, "
              f"loss {r['loss']:.4f}", file=sys.stderr)
        best = results.get(name)
        if memory and not cuda and best is not None:  # the profiled run gives memory, not speed
            best.update({k: r[k] for k in ("tensor_peak_gb", "load_peak_gb", "train_peak_gb")})
        elif best is None or r["train_s"] < best["train_s"]:  # (CPU memory comes last, after every speed run)
            results[name] = r

    print(table(results, n_pairs, n_tokens, args.workload))
    if args.json:
        Path(args.json).write_text(json.dumps({"workload": args.workload, "device": device_name(),
                                               "versions": versions(), "pairs": n_pairs, "tokens": n_tokens,
                                               "results": results}, indent=2))
    return 0


def table(results: dict, pairs: int, tokens: int, workload: str) -> str:
    """Markdown table: steps only, then with the reference pre-pass where the contestant has one. Memory: peak
    tensor memory (memtrack) of the whole run and of training alone (the load's transient left out), and
    the process's peak (GPU: max_memory_allocated, the same as the first; CPU: RSS, libraries included)."""
    base = results.get("trl")
    ratio = lambda r, key: f"{r[key] / base[key]:.2f}x" if base and base.get(key) and r.get(key) else "-"
    gb = lambda r, key: f"{r[key]:.3f}" if r.get(key) else "-"
    lines = [f"| {workload} | pairs/s | tokens/s | tensor peak (GB) | training peak (GB) | plan (GB) | "
             "process peak (GB) | pairs/s vs TRL | tensor peak vs TRL | training peak vs TRL |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        rows = [(name, r["train_s"])]
        if r["ref_s"] > 0:
            rows.append((f"{name} +ref", r["train_s"] + r["ref_s"]))
        for label, secs in rows:
            speed = f"{(base['train_s'] / secs):.2f}x" if base else "-"
            lines.append(f"| {label} | {pairs / secs:.2f} | {tokens / secs:.0f} | {gb(r, 'tensor_peak_gb')} | "
                         f"{gb(r, 'train_peak_gb')} | {gb(r, 'plan_gb')} | {r['peak_gb']:.2f} | {speed} | "
                         f"{ratio(r, 'tensor_peak_gb')} | {ratio(r, 'train_peak_gb')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
