"""PNG curves of a run: loss, reward accuracy, reward margin and KL to the reference, from metrics.jsonl.

`write_plots(run_dir)` writes `plots/{loss,accuracy,margin,kl}.png` (train and eval on the same axes) and
`plots/overview.png` (the four in a 2x2 grid, for the README and the model card). The trainer calls it every
few logged steps while the app may be reading the files, so each PNG is replaced atomically, and it draws on
`matplotlib.figure.Figure` objects with the Agg canvas directly: no pyplot, so no global figure state, no
interactive backend, and calls from several threads do not share anything. For speed each curve is rendered
once and the overview is tiled from the same pixels rather than drawn again.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image  # pillow: a dependency of matplotlib, which writes its PNGs with it too
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .metrics import read_metrics
from .rundir import RunDir

__all__ = ["CURVES", "write_plots"]

# (file stem, metric name in metrics.jsonl, title, y-axis label)
CURVES = (
    ("loss", "loss", "Loss", "loss"),
    ("accuracy", "rewards/accuracies", "Reward accuracy", "share of pairs, chosen reward > rejected"),
    ("margin", "rewards/margins", "Reward margin", "chosen − rejected reward"),
    ("kl", "kl", "KL to the reference", "nats per completion token"),
)
SMOOTH_EVERY = 50  # train curves with n points get an EMA spanning n // 50 points (raw drawn faint); < 100: raw only
_TRAIN, _EVAL = "C0", "C1"  # matplotlib's default blue and orange
_SIZE, _DPI = (6.4, 4.0), 100  # inches, dots per inch: each curve is 640x400 pixels, the overview 1280x800
# fixed margins (fractions of the figure) instead of a layout engine, which would cost about as much as drawing
_MARGINS = dict(left=0.12, right=0.97, bottom=0.12, top=0.92)
_PNG_LEVEL = 3  # zlib level: faster to write than the default 6, files barely larger


def write_plots(run_dir: str | Path) -> list[Path]:
    """Write the curves of `run_dir/metrics.jsonl` to `run_dir/plots/` and return the paths written:
    loss.png, accuracy.png, margin.png, kl.png, overview.png. A missing file, or one with no plottable row,
    writes nothing and returns []. Rows whose value is missing or not finite are left out of that curve; a
    torn last line (the trainer is still writing it) is skipped."""
    run = RunDir.of(run_dir)
    try:
        rows = read_metrics(run.metrics)
    except FileNotFoundError:
        return []
    curves = {m: {split: series(rows, split, m) for split in ("train", "eval")} for _, m, _, _ in CURVES}
    if not any(steps for by_split in curves.values() for steps, _ in by_split.values()):
        return []

    out = run.plots
    out.mkdir(parents=True, exist_ok=True)
    written, images = [], []
    for stem, metric, title, ylabel in CURVES:
        image = _render(curves[metric], metric, title, ylabel)
        written.append(_save(image, out / f"{stem}.png"))
        images.append(image)
    overview = np.concatenate([np.concatenate(images[:2], axis=1), np.concatenate(images[2:], axis=1)], axis=0)
    written.append(_save(overview, out / "overview.png"))
    return written


def series(rows: list[dict], split: str, metric: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one metric in one split, in step order; rows without a finite value are left out."""
    points = []
    for row in rows:
        if not isinstance(row, dict) or row.get("split", "train") != split:
            continue
        step, value = row.get("step"), row.get(metric)
        if _finite(step) and _finite(value):
            points.append((step, value))
    points.sort(key=lambda p: p[0])  # stable: rows logged for the same step keep their order
    return [p[0] for p in points], [p[1] for p in points]


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _ema(values: list[float], span: int) -> list[float]:
    """Exponential moving average (weight 2 / (span + 1), as pandas' `span`), bias-corrected like Adam's
    moments so that the first points are not pulled toward zero. Written by hand: numpy alone has no EMA."""
    alpha, avg, norm, out = 2.0 / (span + 1), 0.0, 0.0, []
    for v in values:
        avg = (1 - alpha) * avg + alpha * v
        norm = (1 - alpha) * norm + alpha
        out.append(avg / norm)
    return out


def _render(series: dict, metric: str, title: str, ylabel: str) -> np.ndarray:
    """One curve as RGB pixels, [400, 640, 3] uint8."""
    fig = Figure(figsize=_SIZE, dpi=_DPI)
    canvas = FigureCanvasAgg(fig)  # attaches itself to the figure: Agg rendering without pyplot
    fig.subplots_adjust(**_MARGINS)
    _draw(fig.add_subplot(), series, metric, title, ylabel)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[:, :, :3].copy()  # the background is opaque: alpha carries nothing


def _draw(ax, series: dict, metric: str, title: str, ylabel: str) -> None:
    (train_x, train_y), (eval_x, eval_y) = series["train"], series["eval"]
    span = len(train_y) // SMOOTH_EVERY
    if span >= 2:
        ax.plot(train_x, train_y, color=_TRAIN, alpha=0.25, linewidth=0.8)
        ax.plot(train_x, _ema(train_y, span), color=_TRAIN, linewidth=1.8, label="train (smoothed; raw faint)")
    elif train_y:
        ax.plot(train_x, train_y, color=_TRAIN, linewidth=1.8, marker="." if len(train_y) < 2 else None, label="train")
    if eval_y:
        ax.plot(eval_x, eval_y, color=_EVAL, linewidth=1.4, marker="o", markersize=4, label="eval")
    if metric == "rewards/accuracies":
        ax.axhline(0.5, color="grey", linestyle=":", linewidth=1, label="chance")
        ax.set_ylim(-0.02, 1.02)
    elif metric in ("rewards/margins", "kl"):
        ax.axhline(0.0, color="grey", linestyle=":", linewidth=1)
    if not (train_y or eval_y):
        ax.text(0.5, 0.5, f"no {metric} logged yet", transform=ax.transAxes, ha="center", va="center", color="grey")
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    # steps are whole numbers, even in a short run; ticks at multiples of 1, 2 or 5
    ax.xaxis.set_major_locator(MaxNLocator(nbins="auto", steps=[1, 2, 5, 10], integer=True))
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if train_y or eval_y:
        ax.legend(loc="best", fontsize="small")


def _write_png(f, image: np.ndarray) -> None:
    Image.fromarray(image).save(f, format="PNG", compress_level=_PNG_LEVEL)


def _save(image: np.ndarray, path: Path) -> Path:
    """Write a PNG to a uniquely named temporary sibling, then rename it over `path`: a reader sees the old
    PNG or the new one, never half of one, and two writers do not share a temporary file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            _write_png(f, image)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; a plot is for anyone who can read the run
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path
