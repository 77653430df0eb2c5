"""Preference losses as pure functions of per-sequence log-probs, the rewards they imply, and the registry of
losses that every other module asks.

Every input is a [B] tensor of completion log-probs (summed, or averaged over completion tokens) for B
preference pairs. Everything is computed in float32, and log sigma(x) is always `F.logsigmoid(x)`, which stays
finite where `log(sigmoid(x))` underflows to -inf.

A loss is declared once, by `register_loss(LossSpec(...))` at the end of this module: its function, whether it
needs a reference model, whether it is defined on mean log-probs per token, whether beta can hold the policy
near the reference (a finite optimum), whether it takes pairs or unpaired examples, and which `loss.*` recipe
keys it reads. The recipe's `loss.name` is checked against this registry, the trainer picks its method from
it, and nothing else keeps a list of loss names. Adding a loss is one entry and its hand-worked test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def preference_logits(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
) -> Tensor:
    """h = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)), shape [B].

    All four inputs are [B]. h > 0 when the policy, relative to the reference, favours the chosen
    completion y_w over the rejected y_l.
    """
    chosen_logratios = policy_chosen_logps.float() - reference_chosen_logps.float()
    rejected_logratios = policy_rejected_logps.float() - reference_rejected_logps.float()
    return chosen_logratios - rejected_logratios


def dpo_loss(logits: Tensor, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """Sigmoid DPO loss, [B] -> [B] (Rafailov et al. 2023, eq. 7): -log sigma(beta * h).

    With label_smoothing e > 0 this is conservative DPO (cDPO, Mitchell 2023), which assumes each label
    is flipped with probability e: -(1 - e) * log sigma(beta * h) - e * log sigma(-beta * h).
    """
    logits = logits.float()
    e = label_smoothing
    return -(1 - e) * F.logsigmoid(beta * logits) - e * F.logsigmoid(-beta * logits)


def ipo_loss(logits: Tensor, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """IPO loss, [B] -> [B] (Azar et al. 2023): (h - 1 / (2 * beta))**2, with beta as the paper's tau.

    The square pulls h to the margin 1/(2 tau) instead of pushing it to infinity. The paper defines h on
    length-averaged log-probs (its LossSpec says length_normalized). label_smoothing is accepted for a
    uniform signature and ignored: IPO has no label-noise variant here.
    """
    return (logits.float() - 1 / (2 * beta)) ** 2


def hinge_loss(logits: Tensor, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """Hinge loss of SLiC, [B] -> [B] (Zhao et al. 2023): max(0, 1 - beta * h).

    beta acts as 1/delta, the margin's inverse. label_smoothing is accepted for a uniform signature and
    ignored.
    """
    return F.relu(1 - beta * logits.float())


def robust_loss(logits: Tensor, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """Robust DPO (rDPO), [B] -> [B] (Chowdhury et al. 2024), for labels flipped with rate e < 1/2:

        ((1 - e) * -log sigma(beta * h) - e * -log sigma(-beta * h)) / (1 - 2e)

    An unbiased estimate of the clean-label DPO loss; equals `dpo_loss` when e = 0.
    """
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"robust_loss needs label_smoothing in [0, 0.5), got {label_smoothing}")
    logits = logits.float()
    e = label_smoothing
    return ((1 - e) * -F.logsigmoid(beta * logits) - e * -F.logsigmoid(-beta * logits)) / (1 - 2 * e)


# ------------------------------------------------------------------------------------ without a reference
# SimPO and ORPO score the policy alone, on length-averaged log-probs: no reference pass at all, so the
# smallest GPUs pay for one forward and backward per step. Inputs are [B] mean log-probs per completion token.


def simpo_loss(chosen_avg: Tensor, rejected_avg: Tensor, beta: float, gamma: float) -> Tensor:
    """SimPO, [B] -> [B] (Meng et al. 2024): -log sigma(beta * (avg log pi(y_w) - avg log pi(y_l)) - gamma).

    The implicit reward is beta times the mean log-prob per token (no reference); gamma is a target margin
    between the rewards of chosen and rejected."""
    return -F.logsigmoid(beta * (chosen_avg.float() - rejected_avg.float()) - gamma)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012): log(-expm1(x)) near 0, where
    1 - exp(x) loses its digits, and log1p(-exp(x)) further out."""
    x = x.float().clamp(max=-1e-7)  # a mean log-prob of exactly 0 would make the odds infinite
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(chosen_avg: Tensor, rejected_avg: Tensor, beta: float) -> Tensor:
    """ORPO, [B] -> [B] (Hong et al. 2024): NLL(y_w) - beta * log sigma(log odds(y_w) - log odds(y_l)).

    p = exp(mean log-prob per token) and odds(y) = p / (1 - p); the NLL term is the mean per-token negative
    log-likelihood of the chosen reply (supervised fine-tuning and preference in one loss, beta is the
    paper's lambda)."""
    a, b = chosen_avg.float(), rejected_avg.float()
    log_odds = (a - b) - (log1mexp(a) - log1mexp(b))
    return -a - beta * F.logsigmoid(log_odds)


# ------------------------------------------------------------------------------------------------ KTO


def kto_reference_point(policy_logps: Tensor, reference_logps: Tensor) -> Tensor:
    """KTO's reference point z0, a scalar: the batch estimate of KL(pi || pi_ref), clamped at 0 and detached.

    Estimated, as in the KTO paper, on mismatched (prompt, completion) examples of the batch: completions
    that answer another prompt, which the policy has no reason to favour. Inputs: [M] summed log-probs of
    those mismatched completions under the policy and the reference."""
    return (policy_logps.float() - reference_logps.float()).mean().clamp(min=0).detach()


def kto_loss(
    policy_logps: Tensor,
    reference_logps: Tensor,
    desirable: Tensor,
    reference_point: Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> Tensor:
    """KTO, [N] -> [N] (Ethayarajh et al. 2024), for N unpaired examples with a good/bad label:

        desirable:   w_D * (1 - sigma(beta * (r - z0)))
        undesirable: w_U * (1 - sigma(beta * (z0 - r)))

    r = log pi(y|x) - log pi_ref(y|x) (summed log-probs); z0 = `kto_reference_point`; `desirable` is a [N] bool."""
    r = policy_logps.float() - reference_logps.float()
    z = reference_point.float()
    good = desirable_weight * (1 - torch.sigmoid(beta * (r - z)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (z - r)))
    return torch.where(desirable.bool(), good, bad)


def chosen_nll(policy_chosen_logps, chosen_counts) -> Tensor:
    """[B] negative log-likelihood per token of the chosen responses: the term RPO adds to DPO.

    Pang et al. 2024 ("Iterative Reasoning Preference Optimization") add alpha * NLL(y_w) to the DPO loss so
    that the chosen response's likelihood cannot fall while the margin grows: pure DPO is known to lower the
    likelihood of both responses ("likelihood displacement"), which on small models degrades generations.
    policy_chosen_logps: [B] summed log-probs; chosen_counts: [B] completion tokens.
    """
    return -policy_chosen_logps.float() / chosen_counts.float().clamp(min=1)


def implicit_rewards(policy_logps: Tensor, reference_logps: Optional[Tensor], beta: float) -> Tensor:
    """Implicit DPO reward beta * (log pi(y|x) - log pi_ref(y|x)), [B] -> [B], detached (for logging only).
    Without a reference (SimPO, ORPO: `reference_logps` None) the reward is beta * log pi(y|x), the policy's own
    score, as those papers define it."""
    if reference_logps is None:
        return (beta * policy_logps.float()).detach()
    return (beta * (policy_logps.float() - reference_logps.float())).detach()


@dataclass
class PreferenceOutput:
    losses: Tensor  # [B] per-pair loss, with grad
    chosen_rewards: Tensor  # [B] beta * (policy - reference) log-probs of y_w, detached
    rejected_rewards: Tensor  # [B] same for y_l, detached


def preference_loss(
    name: str,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Optional[Tensor],
    reference_rejected_logps: Optional[Tensor],
    beta: float,
    **options: float,
) -> PreferenceOutput:
    """Per-pair loss of the paired loss `name` (see LOSSES) and the implicit rewards; all inputs [B], all outputs
    [B]. The reference log-probs are None for a loss that needs none. `options` are `loss.*` recipe values
    (label_smoothing=0.1, ...); each loss receives those its LossSpec names, so a caller may pass them all."""
    spec = paired_loss(name)
    if spec.needs_reference:
        chosen = policy_chosen_logps.float() - reference_chosen_logps.float()
        rejected = policy_rejected_logps.float() - reference_rejected_logps.float()
    else:
        chosen, rejected = policy_chosen_logps.float(), policy_rejected_logps.float()
        reference_chosen_logps = reference_rejected_logps = None
    kwargs = {key: options[key] for key in spec.options if key in options}
    return PreferenceOutput(
        losses=spec.fn(chosen, rejected, beta, **kwargs),
        chosen_rewards=implicit_rewards(policy_chosen_logps, reference_chosen_logps, beta),
        rejected_rewards=implicit_rewards(policy_rejected_logps, reference_rejected_logps, beta),
    )


# ------------------------------------------------------------------------------------------------ the registry


@dataclass(frozen=True)
class LossSpec:
    """What the rest of lora-dpo needs to know about a loss (torchtune's `is_reference_free`, generalised)."""

    name: str  # the value of the recipe's loss.name
    # paired: fn(chosen, rejected, beta, **options) -> [B], where chosen and rejected are [B] float32 log-ratios
    # log pi(y|x) - log pi_ref(y|x) (or, without a reference, log pi(y|x)); unpaired: see `kto_loss`
    fn: Callable[..., Tensor]
    needs_reference: bool = True  # False: scored on the policy alone, no reference pass at all
    length_normalized: bool = False  # on mean log-probs per completion token (loss.length_normalize overrides
    # it for losses with a reference; a reference-free loss is defined on means)
    finite_optimum: bool = False  # beta can pull the policy back toward the reference (adaptive beta)
    paired: bool = True  # False: unpaired good/bad examples (the KTO method)
    options: tuple[str, ...] = ()  # the loss.* keys it reads, passed to fn by name


LOSSES: dict[str, LossSpec] = {}  # name -> spec, in registration order (the order error messages list them in)


def register_loss(spec: LossSpec) -> LossSpec:
    """Add a loss; its name becomes a valid `loss.name`. Returns the spec. A second spec under a taken name is
    a ValueError (replace one deliberately with `LOSSES[name] = spec`)."""
    if spec.name in LOSSES:
        raise ValueError(f"a loss named {spec.name!r} is already registered")
    LOSSES[spec.name] = spec
    return spec


def paired_loss(name: str) -> LossSpec:
    """The spec of a paired loss, or ValueError naming the valid ones."""
    spec = LOSSES.get(name)
    if spec is None or not spec.paired:
        valid = ", ".join(sorted(n for n, s in LOSSES.items() if s.paired))
        raise ValueError(f"unknown loss {name!r}; valid names: {valid}")
    return spec


register_loss(LossSpec("dpo", lambda c, r, beta, label_smoothing=0.0: dpo_loss(c - r, beta, label_smoothing),
                       options=("label_smoothing",)))
register_loss(LossSpec("ipo", lambda c, r, beta: ipo_loss(c - r, beta), length_normalized=True, finite_optimum=True))
register_loss(LossSpec("hinge", lambda c, r, beta: hinge_loss(c - r, beta), finite_optimum=True))
register_loss(LossSpec("robust", lambda c, r, beta, label_smoothing=0.0: robust_loss(c - r, beta, label_smoothing),
                       options=("label_smoothing",)))
register_loss(LossSpec("simpo", lambda c, r, beta, simpo_gamma=0.5: simpo_loss(c, r, beta, simpo_gamma),
                       needs_reference=False, length_normalized=True, finite_optimum=True, options=("simpo_gamma",)))
register_loss(LossSpec("orpo", lambda c, r, beta: orpo_loss(c, r, beta), needs_reference=False,
                       length_normalized=True, finite_optimum=True))
register_loss(LossSpec("kto", kto_loss, paired=False, options=("desirable_weight", "undesirable_weight")))
