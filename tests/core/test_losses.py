"""Preference losses against values worked out by hand.

Shorthand: h = preference logits, b = beta, e = label_smoothing, sp(x) = -logsigmoid(x) = log(1 + e^-x).
Two identities keep the hand arithmetic short: sp(-x) = sp(x) + x, and so
  cDPO  = (1-e) sp(bh) + e sp(-bh)            = sp(bh) + e*bh
  rDPO  = ((1-e) sp(bh) - e sp(-bh)) / (1-2e) = sp(bh) - e*bh / (1-2e)
Values of sp used below: sp(0.3) = log(1 + e^-0.3) = log(1.740818) = 0.554355
                         sp(-0.2) = log(1 + e^0.2) = log(2.221403) = 0.798139
                         sp(-1)   = log(1 + e)     = log(3.718282) = 1.313262
                         sp(0)    = log 2          = 0.693147
"""

import dataclasses
import math

import pytest
import torch

from lora_dpo.config import LossConfig
from lora_dpo.core.losses import (
    LOSSES,
    dpo_loss,
    hinge_loss,
    implicit_rewards,
    ipo_loss,
    preference_logits,
    preference_loss,
    robust_loss,
)


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


# the registry's views that the tests below pin (core/losses.py keeps one list of losses: LOSSES)
PAIRED = [name for name, spec in LOSSES.items() if spec.paired]
WITH_REFERENCE = [name for name in PAIRED if LOSSES[name].needs_reference]  # on preference logits h


def close(actual, expected):
    torch.testing.assert_close(actual, t(*expected), rtol=0, atol=1e-5)


# Two pairs: chosen -10 vs ref -12, rejected -15 vs ref -14 => h = 2 - (-1) = 3;
#            chosen  -5 vs ref  -5, rejected  -4 vs ref  -6 => h = 0 - 2 = -2.
PC, PR, RC, RR = t(-10.0, -5.0), t(-15.0, -4.0), t(-12.0, -5.0), t(-14.0, -6.0)


def test_preference_logits_is_chosen_logratio_minus_rejected_logratio():
    close(preference_logits(PC, PR, RC, RR), [3.0, -2.0])


def test_preference_logits_are_float32_for_bf16_inputs():
    h = preference_logits(PC.bfloat16(), PR.bfloat16(), RC.bfloat16(), RR.bfloat16())
    assert h.dtype == torch.float32
    close(h, [3.0, -2.0])


def test_dpo_loss_hand_values():
    """b=0.1: h=3 -> sp(0.3) = 0.554355; h=0 -> log 2; h=-2 -> sp(-0.2) = 0.798139.
    b=0.5, h=-2 -> sp(-1) = 1.313262."""
    close(dpo_loss(t(3.0, 0.0, -2.0), beta=0.1), [0.554355, math.log(2), 0.798139])
    close(dpo_loss(t(-2.0), beta=0.5), [1.313262])


def test_conservative_dpo_hand_values():
    """cDPO = sp(bh) + e*bh.  b=0.1, e=0.1: h=3 -> 0.554355 + 0.03 = 0.584355;
    h=0 -> log 2 for any e; b=0.5, e=0.2, h=-2 -> 1.313262 - 0.2 = 1.113262."""
    close(dpo_loss(t(3.0, 0.0), beta=0.1, label_smoothing=0.1), [0.584355, math.log(2)])
    close(dpo_loss(t(-2.0), beta=0.5, label_smoothing=0.2), [1.113262])


def test_conservative_dpo_with_zero_smoothing_equals_dpo():
    h = torch.linspace(-50, 50, 21)
    torch.testing.assert_close(dpo_loss(h, 0.1, label_smoothing=0.0), -torch.nn.functional.logsigmoid(0.1 * h))


def test_ipo_loss_hand_values():
    """(h - 1/(2b))**2.  b=0.1 -> margin 5: h=3 -> (-2)^2 = 4; h=-2 -> (-7)^2 = 49; h=5 -> 0.
    b=0.5 -> margin 1: h=3 -> 4; h=1 -> 0."""
    close(ipo_loss(t(3.0, -2.0, 5.0), beta=0.1), [4.0, 49.0, 0.0])
    close(ipo_loss(t(3.0, 1.0), beta=0.5), [4.0, 0.0])


def test_ipo_loss_ignores_label_smoothing():
    h = t(3.0, -2.0)
    torch.testing.assert_close(ipo_loss(h, 0.1, label_smoothing=0.3), ipo_loss(h, 0.1))


def test_hinge_loss_hand_values():
    """relu(1 - b*h), b=0.1: h=3 -> 0.7; h=-2 -> 1.2; h=0 -> 1; h=10 -> 0 (on the margin); h=20 -> 0."""
    close(hinge_loss(t(3.0, -2.0, 0.0, 10.0, 20.0), beta=0.1), [0.7, 1.2, 1.0, 0.0, 0.0])


def test_robust_loss_hand_values():
    """rDPO = sp(bh) - e*bh/(1-2e).  b=0.1, e=0.1, h=3 -> 0.554355 - 0.03/0.8 = 0.516855;
    h=0 -> (1-2e) log 2 / (1-2e) = log 2; b=0.5, e=0.2, h=-2 -> 1.313262 + 0.2/0.6 = 1.646595."""
    close(robust_loss(t(3.0, 0.0), beta=0.1, label_smoothing=0.1), [0.516855, math.log(2)])
    close(robust_loss(t(-2.0), beta=0.5, label_smoothing=0.2), [1.646595])


def test_robust_loss_with_zero_smoothing_equals_dpo():
    h = torch.linspace(-50, 50, 21)
    torch.testing.assert_close(robust_loss(h, 0.1, 0.0), dpo_loss(h, 0.1, 0.0))


@pytest.mark.parametrize("e", [0.5, 0.7, -0.1])
def test_robust_loss_rejects_smoothing_outside_zero_to_half(e):
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        robust_loss(t(1.0), 0.1, label_smoothing=e)


@pytest.mark.parametrize("beta,e", [(0.1, 0.0), (0.1, 0.1), (0.5, 0.25)])
def test_dpo_gradient_wrt_policy_chosen_matches_closed_form(beta, e):
    """dL/dh = -b(1-e) sigmoid(-bh) + b e sigmoid(bh), and dh/d(policy_chosen) = 1.
    By hand at b=0.1, e=0, h=0: -0.1 * 0.5 = -0.05 (the first entry below)."""
    pc = t(-12.0, -10.0, -5.0, -30.0).requires_grad_()
    pr, rc, rr = t(-14.0, -15.0, -4.0, -1.0), t(-12.0, -12.0, -5.0, -8.0), t(-14.0, -14.0, -6.0, -9.0)
    h = preference_logits(pc, pr, rc, rr).detach()  # [0, 3, -2, -30]
    dpo_loss(preference_logits(pc, pr, rc, rr), beta, e).sum().backward()
    expected = -beta * torch.sigmoid(-beta * h) * (1 - e) + beta * e * torch.sigmoid(beta * h)
    torch.testing.assert_close(pc.grad, expected)
    if (beta, e) == (0.1, 0.0):
        assert pc.grad[0].item() == pytest.approx(-0.05)


@pytest.mark.parametrize("name", PAIRED)
def test_losses_stay_finite_with_gradients_at_extreme_logits(name):
    """h = +-1e4 with b = 1: log(sigmoid(-1e4)) is log(0) = -inf in float32; logsigmoid is not."""
    assert torch.isinf(torch.log(torch.sigmoid(t(-1e4)))).all()  # the trap being guarded against
    h = t(1e4, -1e4).requires_grad_()
    spec = LOSSES[name]
    loss = spec.fn(h, torch.zeros_like(h), 1.0, **{key: 0.1 for key in spec.options})  # chosen - rejected = h
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(h.grad).all()


def test_dpo_at_extreme_logits_is_linear_in_the_tail():
    """b=1: sp(1e4) = 0 (to float32) and sp(-1e4) = 1e4 + sp(1e4) = 1e4; slope -b*sigmoid(-bh) = 0 and -1."""
    h = t(1e4, -1e4).requires_grad_()
    loss = dpo_loss(h, 1.0)
    loss.sum().backward()
    close(loss, [0.0, 1e4])
    close(h.grad, [0.0, -1.0])


def test_implicit_rewards_are_beta_times_logratio_and_detached():
    """b=0.1: 0.1 * (-10 - -12) = 0.2; 0.1 * (-15 - -14) = -0.1."""
    policy = t(-10.0, -15.0).requires_grad_()
    rewards = implicit_rewards(policy, t(-12.0, -14.0), 0.1)
    close(rewards, [0.2, -0.1])
    assert not rewards.requires_grad


# Hand values for PC, PR, RC, RR above (h = [3, -2]) at b = 0.1, e = 0.1, so bh = [0.3, -0.2]:
#   dpo (cDPO): sp(bh) + e*bh        = [0.554355 + 0.03, 0.798139 - 0.02]   = [0.584355, 0.778139]
#   ipo:        (h - 5)^2            = [4, 49]
#   hinge:      relu(1 - bh)         = [0.7, 1.2]
#   robust:     sp(bh) - e*bh/0.8    = [0.554355 - 0.0375, 0.798139 + 0.025] = [0.516855, 0.823139]
# A loss with a reference added to LOSSES without a row here fails with KeyError.
EXPECTED_LOSSES = {
    "dpo": [0.584355, 0.778139],
    "ipo": [4.0, 49.0],
    "hinge": [0.7, 1.2],
    "robust": [0.516855, 0.823139],
}


@pytest.mark.parametrize("name", WITH_REFERENCE)
def test_preference_loss_gives_hand_values_and_detached_rewards(name):
    """Rewards: chosen 0.1 * [-10 - -12, -5 - -5] = [0.2, 0]; rejected 0.1 * [-15 - -14, -4 - -6] = [-0.1, 0.2]."""
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    out = preference_loss(name, pc, pr, RC, RR, beta=0.1, label_smoothing=0.1)
    close(out.losses, EXPECTED_LOSSES[name])
    close(out.chosen_rewards, [0.2, 0.0])
    close(out.rejected_rewards, [-0.1, 0.2])
    assert out.losses.requires_grad
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    out.losses.sum().backward()
    # h depends on the policy as +pc - pr, so the two gradients are opposite and nonzero.
    torch.testing.assert_close(pc.grad, -pr.grad)
    assert (pc.grad != 0).all()


def test_preference_loss_unknown_name_raises_listing_valid_names():
    with pytest.raises(ValueError, match="sigmoidd") as info:
        preference_loss("sigmoidd", PC, PR, RC, RR, beta=0.1)
    for name in PAIRED:
        assert name in str(info.value)


def test_loss_names_equal_config_literal():
    """The names a recipe's loss.name accepts are the registry's: there is no second list to fall behind."""
    (name_field,) = [f for f in dataclasses.fields(LossConfig) if f.name == "name"]
    assert set(name_field.metadata["choices"]()) == set(LOSSES)


def test_simpo_loss_hand_values():
    """b=2, gamma=0.5. Pair 1: avg log-probs -1 vs -1.5: sp(2 * 0.5 - 0.5) = sp(0.5) = log(1 + e^-0.5) = 0.474077.
    Pair 2: -2 vs -1: sp(2 * -1 - 0.5) = sp(-2.5) = log(1 + e^2.5) = 2.578890."""
    from lora_dpo.core.losses import simpo_loss

    close(simpo_loss(t(-1.0, -2.0), t(-1.5, -1.0), beta=2.0, gamma=0.5), [0.474077, 2.578890])


def test_log1mexp_is_accurate_near_zero_and_far_out():
    from lora_dpo.core.losses import log1mexp

    x = t(-1e-3, -0.5, -1.0, -50.0)
    expected = [math.log(-math.expm1(v)) for v in (-1e-3, -0.5, -1.0)] + [-math.exp(-50.0)]
    torch.testing.assert_close(log1mexp(x), t(*expected), rtol=1e-5, atol=0)
    assert torch.isfinite(log1mexp(t(0.0))).all()  # a mean log-prob of 0 (p = 1) stays finite


def test_orpo_loss_hand_value():
    """avg log-probs a=-1 (chosen), b=-2 (rejected), lambda=0.1:
    log(1-e^-1) = -0.458675, log(1-e^-2) = -0.145413; log odds ratio = (a-b) - (-0.458675 + 0.145413) = 1.313262;
    sp(1.313262) = log(1 + 1/(1+e)) = log(4.718282 / 3.718282) = 0.238183; loss = NLL 1 + 0.1 * 0.238183."""
    from lora_dpo.core.losses import orpo_loss

    a = t(-1.0).requires_grad_()
    close(orpo_loss(a, t(-2.0), beta=0.1), [1.0238183])
    orpo_loss(a, t(-2.0), beta=0.1).sum().backward()
    assert a.grad.item() < -1  # raising the chosen log-prob lowers both the NLL and the odds-ratio term


def test_kto_loss_hand_values_and_reference_point():
    """r = policy - reference = [2, -2]; z0 = 0.5, b = 0.1, w_D = 1, w_U = 2.
    desirable: 1 - sigma(0.1 * (2 - 0.5)) = 1 - sigma(0.15) = 0.462570;
    undesirable: 2 * (1 - sigma(0.1 * (0.5 + 2))) = 2 * (1 - sigma(0.25)) = 0.875647."""
    from lora_dpo.core.losses import kto_loss, kto_reference_point

    out = kto_loss(t(-10.0, -10.0), t(-12.0, -8.0), torch.tensor([True, False]), torch.tensor(0.5), 0.1, 1.0, 2.0)
    close(out, [0.462570, 0.875647])
    # z0: mean of mismatched log-ratios [1, 2] = 1.5; a negative mean ([1, -2] -> -0.5) is clamped to 0
    assert kto_reference_point(t(-5.0, -7.0), t(-6.0, -9.0)).item() == 1.5
    assert kto_reference_point(t(-5.0, -7.0), t(-6.0, -5.0)).item() == 0.0
    p = t(-5.0).requires_grad_()
    assert not kto_reference_point(p, t(-6.0)).requires_grad  # z0 carries no gradient


def test_only_ipo_is_length_normalized_by_default():
    length_normalized_by_default = {name for name in WITH_REFERENCE if LOSSES[name].length_normalized}
    assert length_normalized_by_default == {"ipo"}
    assert length_normalized_by_default <= set(LOSSES)


def test_chosen_nll_is_the_mean_negative_log_prob_per_chosen_token():
    """Summed log-probs -6 over 3 tokens and -1 over 1 token: per-token NLL 2.0 and 1.0."""
    from lora_dpo.core.losses import chosen_nll

    nll = chosen_nll(torch.tensor([-6.0, -1.0]), torch.tensor([3.0, 1.0]))
    assert nll.tolist() == [2.0, 1.0]
