"""Export a finished run: its adapter or the adapter merged into the 16-bit base (pipeline.py, merge.py), with a
model card (card.py), pushed to the Hugging Face Hub (hub.py). Names load on first use (lazy.py)."""

from ..lazy import lazy_names

_OWNERS = {
    "DTYPES": ".tolerance", "TOLERANCES": ".tolerance", "ExportResult": ".pipeline", "export": ".pipeline",
    "PushResult": ".hub", "check_repo_id": ".hub", "push": ".hub", "scrub": ".hub",
}  # fmt: skip
__all__ = sorted(_OWNERS)
__getattr__, __dir__ = lazy_names(__name__, _OWNERS)
