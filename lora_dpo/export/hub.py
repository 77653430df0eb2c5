"""Upload an export folder to the Hugging Face Hub, or list what would go, without leaking the token.

    push(folder, repo_id, private=False, revision=None, token=None, dry_run=False) -> PushResult

All Hub calls go through one HfApi built by HF_API_FACTORY (tests replace it here, in this module, with a
fake that records its calls). Network and Hub failures become one UserError that says how to retry; the
token is scrubbed from every message.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from huggingface_hub import HfApi
from huggingface_hub import errors as hub_errors
from huggingface_hub.errors import LocalTokenNotFoundError
from huggingface_hub.utils import validate_repo_id

from ..errors import UserError, first_line
from .merge import format_size

_TOKEN = re.compile(r"hf_[A-Za-z0-9]{6,}")  # how Hugging Face tokens look: scrubbed from every message we print


def _default_api(token: Optional[str]):
    return HfApi(token=token)  # token None: huggingface_hub finds HF_TOKEN or the saved login itself


# Builds the HfApi that `push` uses (token -> api); tests and the app may replace it. `push` looks it up in
# this module, so replace `lora_dpo.export.hub.HF_API_FACTORY` (nothing re-exports it: a replaced copy
# elsewhere would be silently ignored, and the real Hub called).
HF_API_FACTORY: Callable[[Optional[str]], Any] = _default_api


def list_files(folder: str | os.PathLike) -> list[tuple[str, int]]:
    """(relative path, bytes) of every file under `folder`, sorted."""
    root = Path(folder)
    return sorted((f.relative_to(root).as_posix(), f.stat().st_size) for f in root.rglob("*") if f.is_file())


@dataclass
class PushResult:
    repo_id: str
    url: str
    revision: Optional[str]
    private: bool
    files: list[tuple[str, int]]
    dry_run: bool

    def listing(self) -> str:
        """The files and sizes that go (or would go) to the Hub."""
        where = self.url + (" (private)" if self.private else "")
        where += f", branch {self.revision}" if self.revision else ""
        head = f"{'dry run: would upload' if self.dry_run else 'uploaded'} {len(self.files)} files to {where}:"
        width = max((len(name) for name, _ in self.files), default=0)
        rows = [f"  {name:<{width}}  {format_size(size):>10}" for name, size in self.files]
        total = f"  total {format_size(sum(n for _, n in self.files))}"
        tail = ["nothing was sent to the Hub"] if self.dry_run else []
        return "\n".join([head, *rows, total, *tail])


def check_repo_id(repo_id: str) -> str:
    """`OWNER/NAME`, or a UserError that says so."""
    parts = repo_id.split("/") if isinstance(repo_id, str) else []
    if len(parts) != 2 or not all(parts):
        raise UserError(f"--push-to-hub {repo_id!r}: expected OWNER/NAME, for example alice/qwen2.5-1.5b-dpo")
    try:
        validate_repo_id(repo_id)
    except ValueError as exc:
        raise UserError(f"--push-to-hub {repo_id!r}: {str(exc).splitlines()[0]}") from None
    return repo_id


def _network_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError]  # HfHubHTTPError, LocalTokenNotFoundError, requests' errors
    if hasattr(hub_errors, "HTTPError"):  # the HTTP client's base error, whatever the client
        errors.append(hub_errors.HTTPError)
    for module, name in (("httpx", "HTTPError"), ("requests", "RequestException")):
        with contextlib.suppress(ImportError):
            errors.append(getattr(__import__(module), name))
    return tuple(errors)


def scrub(text: str, token: Optional[str]) -> str:
    """`text` with the token (and anything that looks like a Hugging Face token) replaced by stars."""
    if token:
        text = text.replace(token, "***")
    return _TOKEN.sub("hf_***", text)


def push(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: Optional[str] = None,
    token: Optional[str] = None,
    dry_run: bool = False,
    api: Any = None,
    commit_message: str = "Upload lora-dpo export",
) -> PushResult:
    """Upload an export folder to the model repo `repo_id`, created if missing (private when asked), on
    branch `revision` when given (created if missing). `token` is used only to build the HfApi (None lets
    huggingface_hub find HF_TOKEN or the saved login); it is never printed, logged or written. `api`
    replaces the HfApi from HF_API_FACTORY. `dry_run` lists the files and calls nothing. Network and Hub
    errors raise one UserError; the local folder is never changed."""
    repo_id = check_repo_id(repo_id)
    folder = Path(folder)
    if not (folder / "README.md").is_file():
        raise UserError(f"{folder}: not an export folder (no README.md); run lora-dpo export first")
    files = list_files(folder)
    url = f"https://huggingface.co/{repo_id}"
    if dry_run:
        return PushResult(repo_id, url, revision, private, files, dry_run=True)
    try:
        api = api if api is not None else HF_API_FACTORY(token)
        created = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        url = str(created) if isinstance(created, str) and created else url
        if private and not getattr(api.repo_info(repo_id, repo_type="model"), "private", True):
            raise UserError(
                f"{repo_id} already exists and is public; --private only applies to a new repository. Nothing was "
                "uploaded: make it private in its settings on the Hub, or choose another name"
            )
        if revision:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=revision,
                          commit_message=commit_message)  # fmt: skip
    except UserError:
        raise
    except _network_errors() as exc:
        raise UserError(scrub(_push_failure(exc, repo_id, folder, private, revision), token)) from None
    return PushResult(repo_id, url, revision, private, files, dry_run=False)


def _push_failure(exc: BaseException, repo_id: str, folder: Path, private: bool, revision: Optional[str]) -> str:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    hint = ""
    if isinstance(exc, LocalTokenNotFoundError) or status in (401, 403):
        hint = f" Set HF_TOKEN, or run `hf auth login`, with a token that can write to {repo_id.split('/')[0]}."
    retry = f"hf upload {repo_id} {folder} ." + (" --private" if private else "")
    retry += f" --revision {revision}" if revision else ""
    return (f"could not push to the Hugging Face Hub ({repo_id}): {first_line(exc)}.{hint} The export in "
            f"{folder} is complete and unchanged; to retry the upload: {retry}")
