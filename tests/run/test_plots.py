"""lora_dpo.plots: PNG curves from a hand-written metrics.jsonl."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import matplotlib.image
import pytest

from lora_dpo.run import plots
from lora_dpo.run.plots import write_plots

NAMES = ["loss.png", "accuracy.png", "margin.png", "kl.png", "overview.png"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def rows(steps: int = 120, eval_every: int = 40) -> list[dict]:
    """A run that learns: train rows every step (enough to be smoothed), eval rows every `eval_every`."""
    out = []
    for step in range(1, steps + 1):
        out.append({"step": step, "epoch": step / steps, "split": "train", "loss": 0.69 - 0.003 * step,
                    "rewards/accuracies": 0.5 + 0.003 * step, "rewards/margins": 0.01 * step, "kl": 0.0005 * step,
                    "lr": 1e-4})  # fmt: skip
        if step % eval_every == 0:
            out.append({"step": step, "split": "eval", "loss": 0.7 - 0.002 * step,
                        "rewards/accuracies": 0.5 + 0.002 * step, "rewards/margins": 0.008 * step,
                        "kl": 0.0004 * step})  # fmt: skip
    return out


def write_metrics(run: Path, metrics: list[dict], tail: str = "") -> Path:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics) + tail)
    return run


def test_writes_the_five_pngs_at_their_pixel_sizes(tmp_path):
    run = write_metrics(tmp_path / "run", rows())
    written = write_plots(run)
    assert written == [run / "plots" / name for name in NAMES]
    for path in written:
        assert path.read_bytes()[:8] == PNG_MAGIC
    for path in written[:4]:
        assert matplotlib.image.imread(path).shape == (400, 640, 3)  # 6.4 x 4 inches at 100 dpi, RGB
    assert matplotlib.image.imread(written[4]).shape == (800, 1280, 3)  # the four, 2 x 2


def test_the_overview_is_the_four_curves_tiled(tmp_path):
    run = write_metrics(tmp_path / "run", rows())
    loss, accuracy, margin, kl, overview = (matplotlib.image.imread(p) for p in write_plots(run))
    assert (overview[:400, :640] == loss).all() and (overview[:400, 640:] == accuracy).all()
    assert (overview[400:, :640] == margin).all() and (overview[400:, 640:] == kl).all()


def test_missing_or_empty_metrics_write_nothing(tmp_path):
    assert write_plots(tmp_path / "no-run") == []
    run = write_metrics(tmp_path / "empty", [])
    assert write_plots(run) == []
    torn_only = write_metrics(tmp_path / "torn", [], tail='{"step": 1, "split": "tr')
    assert write_plots(torn_only) == []
    no_metric = write_metrics(tmp_path / "no-metric", [{"step": 1, "split": "train", "lr": 1e-4}])
    assert write_plots(no_metric) == []
    assert not any((tmp_path / name / "plots").exists() for name in ("empty", "torn", "no-metric"))


def test_a_torn_last_line_is_skipped(tmp_path):
    whole = write_plots(write_metrics(tmp_path / "whole", rows()))
    torn = write_plots(write_metrics(tmp_path / "torn", rows(), tail='{"step": 121, "split": "train", "loss": 0.3'))
    assert [p.read_bytes() for p in torn] == [p.read_bytes() for p in whole]  # same pixels: the torn row is ignored


def test_rows_without_a_metric_or_with_non_finite_values_are_left_out(tmp_path):
    metrics = rows(steps=10, eval_every=5)
    metrics[2]["loss"] = float("nan")  # json writes NaN, which Python's json reads back
    metrics[3]["kl"] = float("inf")
    del metrics[4]["rewards/margins"]
    metrics.append({"step": 10, "split": "eval", "loss": 0.5})  # an eval row with only a loss
    run = write_metrics(tmp_path / "run", metrics)
    assert len(write_plots(run)) == 5


def test_series_keeps_finite_values_of_one_split_in_step_order():
    metrics = [
        {"step": 3, "split": "train", "loss": 0.3},
        {"step": 1, "split": "train", "loss": 0.1},
        {"step": 2, "split": "train", "loss": float("nan")},
        {"step": 4, "split": "train", "kl": 0.01},  # no loss
        {"step": 5, "split": "train", "loss": True},  # not a number
        {"step": 2, "split": "eval", "loss": 0.25},
        {"step": 6, "loss": 0.6},  # no split: a train row
    ]
    assert plots.series(metrics, "train", "loss") == ([1, 3, 6], [0.1, 0.3, 0.6])
    assert plots.series(metrics, "eval", "loss") == ([2], [0.25])


def test_smoothing_is_a_bias_corrected_moving_average():
    assert plots._ema([2.0, 2.0, 2.0], span=3) == [2.0, 2.0, 2.0]  # no pull toward zero at the start
    # span 3: weight 0.5; averages 0.5*2 / 0.5 = 2, (0.5*1 + 0.5*4) / 0.75 = 10/3
    assert plots._ema([2.0, 4.0], span=3) == pytest.approx([2.0, 10 / 3])


def test_each_png_is_replaced_atomically_and_no_temporary_file_is_left(tmp_path, monkeypatch):
    run = write_metrics(tmp_path / "run", rows())
    write_plots(run)
    write_plots(run)  # a refresh replaces the files in place
    assert sorted(p.name for p in (run / "plots").iterdir()) == sorted(NAMES)
    before = (run / "plots" / "loss.png").read_bytes()

    def disk_full(f, image):
        f.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plots, "_write_png", disk_full)
    write_metrics(run, rows(steps=60))
    with pytest.raises(OSError, match="No space left"):
        write_plots(run)
    assert (run / "plots" / "loss.png").read_bytes() == before  # the reader still sees the last whole PNG
    assert sorted(p.name for p in (run / "plots").iterdir()) == sorted(NAMES)


def test_plots_do_not_import_pyplot(tmp_path, monkeypatch):
    # pyplot holds global figure state and may pick an interactive backend; the trainer and the app call this
    monkeypatch.delitem(sys.modules, "matplotlib.pyplot", raising=False)  # restored after the test
    importlib.reload(plots)  # the module's own imports too, not only what a call imports
    assert len(plots.write_plots(write_metrics(tmp_path / "run", rows(steps=3, eval_every=3)))) == 5
    assert "matplotlib.pyplot" not in sys.modules
