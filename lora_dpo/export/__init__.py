"""Export a finished run: its adapter or the adapter merged into the 16-bit base (pipeline.py, merge.py), with a
model card (card.py), pushed to the Hugging Face Hub (hub.py)."""

from .hub import PushResult, check_repo_id, push, scrub
from .merge import DTYPES, TOLERANCES
from .pipeline import ExportResult, export

__all__ = ["DTYPES", "TOLERANCES", "ExportResult", "PushResult", "check_repo_id", "export", "push", "scrub"]
