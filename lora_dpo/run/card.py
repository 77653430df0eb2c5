"""The model card (README.md) of an exported adapter or merged model, and the files it links.

Built with huggingface_hub's `ModelCard` / `ModelCardData`, so the YAML metadata is what the Hub validates:
`base_model` (a Hub id, never a local path: the Hub rejects a card whose base_model is not a model id),
`library_name` (peft for an adapter, transformers for a merged model), tags, datasets and the base's licence.
The body holds the recipe's key settings, the final evaluation, a training plot when the run has one, the
merge verification, and how to load the result. `write_card` puts the card into a folder with what it links
beside it, the run's plots and its recipe: an export's, and a finished run's own adapter/ (the training loop
writes it there, so the folder can be uploaded as it is). Nothing here touches the network.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, Optional

from huggingface_hub import ModelCard, ModelCardData, try_to_load_from_cache
from huggingface_hub.utils import validate_repo_id

from .. import names
from .rundir import RunDir
from .source import Source

TAGS = ["dpo", "lora", "lora-dpo"]

# recipe keys shown in the card, in this order (absent keys are skipped)
RECIPE_KEYS = [
    "model.name", "model.quantization", "lora.r", "lora.alpha", "lora.dropout", "lora.target_modules",
    "loss.name", "loss.beta", "loss.label_smoothing", "data.train", "data.max_length", "train.epochs",
    "train.max_steps", "train.batch_size", "train.grad_accum", "train.lr", "train.scheduler",
    "train.warmup_ratio", "train.seed",
]  # fmt: skip

# eval.json metrics shown first, in this order; other numeric ones follow
METRIC_ORDER = [
    "rewards/accuracies", "rewards/margins", "loss", "kl", "behaviour", "rewards/chosen", "rewards/rejected",
    "logps/chosen", "logps/rejected",
]  # fmt: skip

_TEMPLATE = "---\n{{ card_data }}\n---\n\n{{ body }}\n"
_SNAPSHOT = re.compile(r"^models--([^/]+?)--(.+)$")  # a Hugging Face cache folder: models--owner--name
_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".gz", ".txt", ".tsv", ".arrow", ".yaml", ".yml")


def is_hub_id(name: Optional[str]) -> bool:
    """True for `name` or `owner/name` that the Hub would accept and that is not a local file or folder."""
    if not name or names.registered(name) or name.lower().endswith(_FILE_SUFFIXES) or Path(name).expanduser().exists():
        return False
    try:
        validate_repo_id(name)
    except ValueError:  # HFValidationError
        return False
    return True


def hub_model_id(base: str) -> Optional[str]:
    """The Hub id of a base model given as an id or a folder: a folder inside the Hugging Face cache
    (`.../models--owner--name/snapshots/<commit>`) names its repository; any other folder has no id."""
    if is_hub_id(base):
        return base
    parts = Path(base).expanduser().resolve().parts
    for i, part in enumerate(parts[:-1]):
        match = _SNAPSHOT.match(part)
        if match and parts[i + 1] == "snapshots":
            return f"{match.group(1)}/{match.group(2)}"
    return None


def hub_datasets(recipe: Optional[dict]) -> list[str]:
    """Hub dataset ids the run trained or evaluated on (local files and the toy world are left out)."""
    data = (recipe or {}).get("data") or {}
    out = []
    train = data.get("train")
    if isinstance(train, str) and is_hub_id(train):
        out.append(train)
    ev = data.get("eval")  # a bare word is a split of data.train, owner/name is another dataset
    if isinstance(ev, str) and "/" in ev and is_hub_id(ev) and ev not in out:
        out.append(ev)
    return out


def base_license(base: str, revision: Optional[str] = None) -> dict[str, str]:
    """license / license_name / license_link from the base model's own card, read from disk only: the base
    folder's README.md, or the copy in the Hugging Face cache. {} when it is not on disk."""
    folder = Path(base).expanduser()
    readme: Any = folder / "README.md" if folder.is_dir() else None
    if readme is None:
        try:
            readme = try_to_load_from_cache(base, "README.md", revision=revision)
        except ValueError:  # not a valid repo id
            return {}
        readme = Path(readme) if isinstance(readme, str) else None
    if readme is None or not readme.is_file():
        return {}
    try:
        data = ModelCard.load(readme, ignore_metadata_errors=True).data.to_dict()
    except Exception:  # a card whose YAML does not parse: no licence rather than no export
        return {}
    return {k: data[k] for k in ("license", "license_name", "license_link") if isinstance(data.get(k), str)}


def _dotted(tree: dict, key: str) -> Any:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


def _local_name(value: str) -> str:
    """A local path shown by its last component: a card may be public, the user's folders are not."""
    return f"{Path(value).name} (local)"


def _recipe_section(recipe: dict) -> str:
    rows = [(k, _dotted(recipe, k)) for k in RECIPE_KEYS]
    rows = [(k, _local_name(v) if k in ("model.name", "data.train") and isinstance(v, str) and v != "toy"
             and not is_hub_id(v) else v) for k, v in rows]
    rows = [(k, v) for k, v in rows if v is not None]
    table = "\n".join(f"| `{k}` | {_fmt(v)} |" for k, v in rows)
    note = "The full resolved recipe is in `lora_dpo_recipe.yaml`."
    return f"## Training recipe\n\n| key | value |\n|---|---|\n{table}\n\n{note}"


def _plots_section(plots: list[str]) -> list[str]:
    if not plots:
        return []
    more = ", ".join(f"[{Path(p).stem}]({p})" for p in plots[1:])
    return ["", f"![training curves]({plots[0]})"] + (["", f"More curves: {more}."] if more else [])


def _eval_section(final: dict, plots: list[str]) -> str:
    baseline = final.get("baseline") or {}
    numeric = [k for k, v in final.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    # the named metrics first, then any other TRL-style `group/name` metric; counters such as `step` are left out
    keys = [k for k in METRIC_ORDER if k in numeric] + [k for k in numeric if k not in METRIC_ORDER and "/" in k]
    lines = [
        "## Evaluation",
        "",
        f"On {final.get('pairs', final.get('examples', '?'))} held-out "
        f"{'preference pairs' if 'pairs' in final else 'examples'} after {final.get('step', '?')} optimizer steps. "
        "Rewards are β·(log π_θ − log π_ref) per sequence, against the reference the run trained with (the base "
        "with the adapter switched off, or the adapter it started from), whose rewards are 0 by definition.",
        "",
        "| metric | reference | tuned |",
        "|---|---|---|",
    ]
    for k in keys:
        ref = baseline.get(k)
        lines.append(f"| `{k}` | {_fmt(ref) if isinstance(ref, (int, float)) else '–'} | {_fmt(final[k])} |")
    return "\n".join(lines + _plots_section(plots))


def _origin_line(origin: dict) -> str:
    """Which weights the base had: the GGUF file it was dequantised from, and the package of an example copy."""
    sha = f" (sha256 `{origin['sha256'][:16]}…`)" if isinstance(origin.get("sha256"), str) else ""
    where = origin.get("from", "")
    if origin.get("package"):
        where = f"the Python package `{origin['package']}`, the example copy of {origin.get('example_of', 'the base')}"
    elif where:
        where = where if is_hub_id(where) else _local_name(where)
    return (f"The base's weights were dequantised from the GGUF file `{origin.get('gguf_file', '?')}`{sha}"
            f"{' in ' + where if where else ''}: close to the original weights, not equal to them. On the original "
            "weights the adapter's outputs differ slightly from those evaluated here.")


def _usage(kind: str, repo: str, base_id: Optional[str]) -> str:
    base = base_id or "BASE_MODEL"
    adapter = f"""```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{base}", dtype="auto")
model = PeftModel.from_pretrained(base, "{repo}")
tokenizer = AutoTokenizer.from_pretrained("{repo}")
```"""
    merge_yourself = """```python
merged = model.merge_and_unload()  # with the base loaded in 16-bit, not 4-bit
merged.save_pretrained("merged")
```

or `lora-dpo export RUN --out merged --merge`, which also checks the merged model's log-probs against
base + adapter."""
    merged = f"""```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo}", dtype="auto")
tokenizer = AutoTokenizer.from_pretrained("{repo}")
messages = [{{"role": "user", "content": "Write a short review of your favourite film."}}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
output = model.generate(**inputs, max_new_tokens=128)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```"""
    if kind == "adapter":
        missing = "" if base_id else "\n\nReplace `BASE_MODEL` with the base model this adapter was trained on.\n"
        return (f"## Usage\n\nWith peft, on the base model:\n\n{adapter}{missing}\n\n"
                f"To get a standalone model, merge it into the 16-bit base:\n\n{merge_yourself}")
    return (f"## Usage\n\nThe adapter is merged into the weights: plain transformers loads it.\n\n{merged}\n\n"
            f"A chat template, when the base has one, is in the tokenizer files.")


def _gguf_usage(name: str) -> str:
    return f"""## GGUF (llama.cpp, Ollama, LM Studio)

`{name}` is this model converted by llama.cpp's `convert_hf_to_gguf.py`, with the tokenizer and its chat template,
and checked against the merged model above.

```sh
llama-cli -m {name} -cnv                      # llama.cpp
llama-quantize {name} model-q4_k_m.gguf q4_k_m  # smaller: llama.cpp's k-quants
printf 'FROM ./{name}\\n' > Modelfile && ollama create my-model -f Modelfile  # Ollama
```"""


def build_card(
    *,
    kind: str,
    repo: str,
    base: str,
    base_id: Optional[str],
    recipe: Optional[dict],
    final: Optional[dict],
    plots: Optional[list[str]] = None,
    verification: Optional[str] = None,
    license: Optional[dict] = None,
    origin: Optional[dict] = None,
    title: Optional[str] = None,
    gguf_file: Optional[str] = None,
) -> ModelCard:
    """The card of an export. kind: 'adapter' or 'merged'; repo: the Hub id it is pushed to, or the local
    folder; base: the base as loaded; base_id: its Hub id (None for a local folder); recipe: the run's
    config.yaml as a dict; final: its eval.json; plots: PNG paths relative to the export folder, the first one
    shown; verification: one line on the merge check; license: from `base_license`; origin: the GGUF file the
    base was dequantised from (run_info.json's base_origin), None for any other base; title: the card's heading,
    else the last part of `repo`; gguf_file: the GGUF file beside a merged model."""
    if kind not in ("adapter", "merged"):
        raise ValueError(kind)
    tags = list(TAGS)
    if _dotted(recipe or {}, "model.quantization") == "nf4":
        tags.append("qlora")
    tags.append("peft" if kind == "adapter" else "merged")
    data = ModelCardData(
        base_model=base_id,
        library_name="peft" if kind == "adapter" else "transformers",
        tags=tags,
        datasets=hub_datasets(recipe) or None,
        pipeline_tag="text-generation",
        **(license or {}),
    )
    name = title or repo.rstrip("/").split("/")[-1]
    base_link = f"[{base_id}](https://huggingface.co/{base_id})" if base_id else f"a local model, {Path(base).name}"
    what = "A LoRA adapter for" if kind == "adapter" else "A merged model: a LoRA adapter merged into"
    parts = [
        f"# {name}",
        f"{what} {base_link}, trained with Direct Preference Optimization (DPO) by lora-dpo.",
    ]
    if origin:
        parts.append(_origin_line(origin))
    if _dotted(recipe or {}, "model.quantization") == "nf4":
        parts.append(
            "The adapter was trained on the base loaded in 4-bit NF4 (QLoRA). "
            + ("Merged into the 16-bit base, the model's outputs differ slightly from those of the 4-bit "
               "policy that was evaluated during training." if kind == "merged" else
               "It loads onto the base in 4-bit or 16-bit alike.")
        )
    if recipe:
        parts.append(_recipe_section(recipe))
    if final:
        parts.append(_eval_section(final, plots or []))
    elif plots:
        parts.append("## Training curves\n" + "\n".join(_plots_section(plots)))
    if verification:
        parts.append(f"## Merge verification\n\n{verification}")
    parts.append(_usage(kind, repo, base_id))
    if gguf_file:
        parts.append(_gguf_usage(gguf_file))
    return ModelCard.from_template(data, template_str=_TEMPLATE, body="\n\n".join(parts))


# what write_card puts beside the weights: an export copies a run's adapter folder without them, and writes its own
CARD_FILES = ("README.md", "plots", "lora_dpo_recipe.yaml")


def write_card(
    folder: Path, src: Source, kind: str, repo: str, base_id: Optional[str], verification: Optional[str] = None,
    title: Optional[str] = None, gguf_file: Optional[str] = None,
) -> None:
    """The card of `src` exported as `kind` into `folder` (README.md), with the files it links beside it: the
    run's plots (plots/) and its recipe (lora_dpo_recipe.yaml). Arguments as for `build_card`."""
    plots = []
    if src.plots:
        (folder / "plots").mkdir(exist_ok=True)
        for png in src.plots:
            shutil.copy2(png, folder / "plots" / png.name)
        # the overview figure (all curves) when the run drew one, else the loss curve, shown first
        first = {"overview": 0, "loss": 1}
        plots = [f"plots/{p.name}" for p in sorted(src.plots, key=lambda p: (first.get(p.stem, 2), p.name))]
    if src.run_dir is not None:
        shutil.copy2(RunDir(src.run_dir).config, folder / "lora_dpo_recipe.yaml")
    base_dir = Path(src.base_name).expanduser()
    licence = base_license(str(base_dir) if base_dir.is_dir() else (base_id or src.base_name), src.revision)
    card = build_card(
        kind=kind, repo=repo, base=src.base_name, base_id=base_id, recipe=src.recipe, final=src.final,
        plots=plots, verification=verification, license=licence, origin=src.base_origin, title=title,
        gguf_file=gguf_file,
    )  # fmt: skip
    card.save(folder / "README.md")
