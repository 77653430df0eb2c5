"""The protocol every training method follows, for the one loop in training/loop.py.

A method says what one micro-batch computes: its examples (`load`, before any model loads), how they are
batched (`collate`), its loss and metrics (`loss`), and its held-out evaluation (`evaluate`). It holds no
state the loop owns: beta and the step arrive in a `StepContext`, the reference log-probs of the examples (when
the loop has precomputed them) as an argument, and the data, the reference tables, the rounds, the schedule and
the processes stay with the loop.

| method            | recipe                                 | examples                  | reference            |
|-------------------|----------------------------------------|---------------------------|----------------------|
| PreferenceMethod  | a paired loss (dpo, ipo, simpo, ...)   | pairs                     | table, or per step;  |
|                   |                                        |                           | none without one     |
| KTOMethod         | an unpaired loss (kto)                 | unpaired, labelled        | table + KL per step  |
| SFTMethod         | stage: sft                             | prompt + response         | none                 |
| OnlineMethod      | online.enabled                         | prompts; pairs sampled    | per step             |
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from ..config import DataConfig, Recipe
from ..core.stats import PairStats, Stats
from ..data.report import DataReport
from ..model.layout import Layout


@dataclass
class Data:
    """A method's examples, encoded before any model loads."""

    train: list
    eval: list
    report: DataReport


@dataclass(frozen=True)
class StepContext:
    """What the loop tells a method about the step being taken."""

    beta: float  # the loop's beta (adaptive beta moves it between steps)
    device: torch.device | str = "cpu"
    step: int = 0  # the optimizer step (online DPO seeds its sampling with it)


class Method:
    unit = "pair"  # what one training example is (pairs_per_s counts these)
    Stats: type[Stats] = PairStats
    reference_width = 2  # sequences per example in a reference table (chosen, rejected)
    precomputes_reference = True  # False: the reference of training examples is computed in each step (online)

    def __init__(self, recipe: Recipe, tokenizer, layout: Layout = Layout(False)):
        self.recipe, self.tokenizer, self.layout = recipe, tokenizer, layout
        self.pad_id = tokenizer.pad_token_id

    @property
    def needs_reference(self) -> bool:
        """Whether the loop runs reference passes for this method at all."""
        return True

    # -- data, before any model loads
    @classmethod
    def build(cls, cfg: DataConfig, tokenizer, seed: int) -> tuple[list, list, DataReport]:
        raise NotImplementedError

    @classmethod
    def load(cls, recipe: Recipe, tokenizer) -> Data:
        """The recipe's training and held-out examples (eval.max_pairs of them at most), and the data report."""
        train, evals, report = cls.build(recipe.data, tokenizer, recipe.train.seed)
        return Data(train, evals[: recipe.eval.max_pairs or None], report)

    @classmethod
    def load_train(cls, recipe: Recipe, tokenizer, source: str) -> list:
        """The training examples of another source (a later round's data), tokenised as data.train is."""
        # data.subset, revision, data_dir and data_files choose within data.train; data.columns holds for every source
        cfg = dataclasses.replace(recipe.data, train=source, eval=None, eval_fraction=0.0, subset=None, revision=None,
                                  data_dir=None, data_files=None)
        return cls.build(cfg, tokenizer, recipe.train.seed)[0]

    # -- what the loop asks of a method
    def collate(self, items: list) -> dict:
        raise NotImplementedError

    def prepare(self, device) -> None:
        """Load what the method needs beside the model (online DPO's judge); called once the model is placed."""

    def loss(self, model, items: list, positions: list[int], reference: Optional[torch.Tensor], ctx: StepContext,
             stats: Stats) -> torch.Tensor:
        """The mean loss of one micro-batch of training examples (`positions`: their places in the round's
        data); adds its metrics to `stats`. `model` is the prepared PolicyLogps; `reference`: the examples' rows
        of the precomputed reference table, or None (computed here when the method needs one)."""
        raise NotImplementedError

    def evaluate(self, model, items: list, reference: Optional[torch.Tensor], ctx: StepContext, stats: Stats) -> None:
        """Add one batch of held-out examples' metrics to `stats` (the loop runs it without gradients)."""
        self.loss(model, items, list(range(len(items))), reference, ctx, stats)
