"""The reward-KL frontier of a sweep, as the DPO paper draws it (its Figure 2): for every run, the reward its policy
reaches against its KL to the reference, at the end and at each evaluation along training; the reference at KL 0;
the non-dominated points joined. Everything is read from what the runs wrote (eval.json, metrics.jsonl).

Reward: the recipe's scorer (`behaviour`, eval.scorer) when the runs have one, else held-out reward accuracy. KL:
the sampled estimate per token (`kl/sampled`: log pi - log pi_ref over the policy's own samples), else the
log-ratio over the dataset's replies (`kl`) when no prompts were sampled.

The recommendation, in one line: the frontier's point of highest reward, unless one with less KL reaches at least
KNEE of its gain over the reference (the knee: nearly the same reward for less drift from the reference).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..run.metrics import read_metrics
from ..run.rundir import RunDir

KNEE = 0.9  # a point with less KL is preferred when it keeps this share of the best point's reward gain


@dataclass
class Point:
    name: str  # the grid point (its run folder's name)
    step: int
    reward: Optional[float]
    kl: Optional[float]
    accuracy: Optional[float] = None
    margin: Optional[float] = None
    beta: Optional[float] = None
    final: bool = True  # the run's final evaluation (else one along training)
    pareto: bool = False  # not dominated (final points only)


@dataclass
class Frontier:
    reward_key: str  # "behaviour" or "rewards/accuracies"
    kl_key: str  # "kl/sampled" or "kl"
    reference_reward: Optional[float]
    finals: list[Point]
    along: list[Point] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)  # grid points without a final evaluation yet
    recommended: Optional[str] = None
    why: str = ""

    @property
    def reward_label(self) -> str:
        return "behaviour score (eval.scorer)" if self.reward_key == "behaviour" else "held-out reward accuracy"

    @property
    def kl_label(self) -> str:
        return "sampled KL to the reference (nats per token)" if self.kl_key == "kl/sampled" else \
            "KL to the reference on the dataset's replies (nats per token)"

    def to_dict(self) -> dict:
        return {**asdict(self), "reward_label": self.reward_label, "kl_label": self.kl_label}

    def table(self) -> str:
        rows = [f"{'point':<24} {'step':>5} {'reward':>8} {'KL':>8} {'accuracy':>8} {'margin':>8}  frontier",
                f"{'reference':<24} {'':>5} {_num(self.reference_reward):>8} {_num(0.0):>8}"]
        for p in sorted(self.finals, key=lambda p: (p.kl is None, p.kl or 0.0)):
            rows.append(f"{p.name:<24} {p.step:>5} {_num(p.reward):>8} {_num(p.kl):>8} {_num(p.accuracy):>8} "
                        f"{_num(p.margin):>8}  {'*' if p.pareto else ''}")
        rows += [f"{name:<24} (not finished)" for name in self.pending]
        rows.append(f"reward: {self.reward_label}; KL: {self.kl_label}; * on the frontier (not dominated)")
        if self.why:
            rows.append(f"recommended: {self.why}")
        return "\n".join(rows)


def _num(value: Optional[float]) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4f}"


def _value(row: dict, key: str) -> Optional[float]:
    value = row.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def frontier_of(runs: list[tuple[str, Path]]) -> Frontier:
    """The frontier of the runs `[(grid point name, run folder)]`; runs without a final eval.json are pending."""
    finished, pending = [], []
    for name, folder in runs:
        run = RunDir(folder)
        if run.eval.is_file():
            finished.append((name, run, json.loads(run.eval.read_text())))
        else:
            pending.append(name)
    reward_key = "behaviour" if finished and all("behaviour" in f for _, _, f in finished) else "rewards/accuracies"
    kl_key = "kl/sampled" if finished and all("kl/sampled" in f for _, _, f in finished) else "kl"
    point = lambda name, row, final: Point(  # noqa: E731
        name, int(row.get("step", 0)), _value(row, reward_key), _value(row, kl_key), _value(row, "rewards/accuracies"),
        _value(row, "rewards/margins"), _value(row, "beta"), final)
    finals, along = [], []
    for name, run, final in finished:
        finals.append(point(name, final, True))
        rows = read_metrics(run.metrics) if run.metrics.is_file() else []
        along += [point(name, r, False) for r in rows
                  if r.get("split") == "eval" and int(r.get("step", 0)) < int(final.get("step", 0))]
    reference = _value(finished[0][2].get("baseline") or {}, reward_key) if finished else None
    if reward_key == "rewards/accuracies" and reference is None and finished:
        reference = 0.0  # the reference's rewards are 0 by definition: no pair is ranked right by a margin
    front = Frontier(reward_key, kl_key, reference, finals, along, pending)
    mark_pareto(front.finals, reference)
    front.recommended, front.why = recommend(front)
    return front


def mark_pareto(points: list[Point], reference: Optional[float] = None) -> None:
    """Mark the points no other point dominates (at most its KL and at least its reward, one of them strictly); the
    reference, at KL 0 with reward `reference`, dominates too (a run worse than it is on no frontier)."""
    usable = [p for p in points if p.reward is not None and p.kl is not None]
    others = usable + ([Point("reference", 0, reference, 0.0)] if reference is not None else [])
    for p in usable:
        p.pareto = not any(q is not p and q.kl <= p.kl and q.reward >= p.reward and (q.kl < p.kl or q.reward > p.reward)
                           for q in others)


def recommend(front: Frontier) -> tuple[Optional[str], str]:
    """The grid point to use, and why in one line (see KNEE)."""
    candidates = [p for p in front.finals if p.pareto]
    measured = [p for p in front.finals if p.reward is not None and p.kl is not None]
    if not measured:
        return None, "no run has finished with both a reward and a KL yet" if front.pending or not front.finals else \
            "no run measured both a reward and a KL"
    ref = front.reference_reward if front.reference_reward is not None else 0.0
    best = max(candidates or measured, key=lambda p: p.reward)
    gain = best.reward - ref
    label = front.reward_label
    if gain <= 0 or not candidates:
        return None, (f"no point improved on the reference's {label} ({ref:.3f}): the runs are too short or too "
                      "gentle to tell the values apart; train longer or raise train.lr before choosing beta")
    knee = min((p for p in candidates if p.reward - ref >= KNEE * gain), key=lambda p: p.kl)
    if knee is best or best.kl <= 0:  # (the dataset's `kl` is a signed mean: no share of it to speak of)
        return best.name, (f"{best.name}: the highest {label} on the frontier, {best.reward:.3f} (reference "
                           f"{ref:.3f}), at a KL of {best.kl:.3f} nats per token")
    return knee.name, (f"{knee.name}: {(knee.reward - ref) / gain:.0%} of the best gain in {label} "
                       f"({knee.reward:.3f} vs {best.reward:.3f} at {best.name}; reference {ref:.3f}) for "
                       f"{knee.kl / best.kl:.0%} of its KL ({knee.kl:.3f} vs {best.kl:.3f} nats per token)")


def draw(front: Frontier, path: Path) -> Optional[Path]:
    """frontier.png: the final points (labelled), the evaluations along training (faded, joined per run), the
    reference, and the frontier through the non-dominated points. None when no point can be drawn."""
    finals = [p for p in front.finals if p.reward is not None and p.kl is not None]
    if not finals:
        return None
    fig = Figure(figsize=(7.5, 5.0), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colours = {p.name: f"C{i % 10}" for i, p in enumerate(sorted(finals, key=lambda p: p.name))}
    for rank, p in enumerate(sorted(finals, key=lambda p: (p.kl, p.reward))):
        trail = sorted((q for q in front.along if q.name == p.name and q.reward is not None and q.kl is not None),
                       key=lambda q: q.step) + [p]
        ax.plot([q.kl for q in trail], [q.reward for q in trail], "-o", color=colours[p.name], alpha=0.3,
                markersize=3, linewidth=1)
        ax.plot([p.kl], [p.reward], "o", color=colours[p.name], markersize=8, label=p.name)
        # neighbours on the curve are labelled at staggered heights, so that close points stay readable
        ax.annotate(p.name, (p.kl, p.reward), textcoords="offset points", xytext=(6, -12 + 10 * (rank % 3)),
                    fontsize=8)
    # the frontier through every measured point, the evaluations along training included (as the paper draws it)
    everything = [Point(p.name, p.step, p.reward, p.kl, final=p.final) for p in finals + front.along
                  if p.reward is not None and p.kl is not None]
    if front.reference_reward is not None:
        ax.plot([0.0], [front.reference_reward], "*", color="black", markersize=13, label="reference")
        everything.append(Point("reference", 0, front.reference_reward, 0.0))
    mark_pareto(everything)
    front_line = sorted((p for p in everything if p.pareto), key=lambda p: (p.kl, p.reward))
    ax.plot([p.kl for p in front_line], [p.reward for p in front_line], "--", color="black", linewidth=1.2,
            label="frontier (no point has more reward for less KL)")
    if front.recommended:
        chosen = next(p for p in finals if p.name == front.recommended)
        ax.plot([chosen.kl], [chosen.reward], "o", markersize=15, markerfacecolor="none", markeredgecolor="red",
                label=f"recommended: {chosen.name}")
    ax.set_xlabel(front.kl_label)
    ax.set_ylabel(front.reward_label)
    ax.set_title("reward against KL to the reference, one run per grid point")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
