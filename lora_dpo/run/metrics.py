"""metrics.jsonl: one JSON object per logged step, appended as training goes, read back by plots and the app."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    """Appends one JSON object per logged step to `metrics.jsonl`, flushed at once so a live reader (the app,
    `tail -f`) sees every row as soon as it exists."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self._file.write(json.dumps({k: _round(v) for k, v in row.items()}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class DiscardLog:
    """The metrics log of a process that writes nothing (not the main one)."""

    def write(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _round(value):
    return round(value, 6) if isinstance(value, float) else value


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a metrics.jsonl; a torn last line (a reader racing the writer) is skipped."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
