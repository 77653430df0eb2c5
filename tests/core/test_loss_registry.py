"""Adding a loss is one registry entry and its hand-worked test: a loss registered here, and nowhere else, is a
valid loss.name, is picked by the trainer, and trains.

The loss below is SPPO's hard-label variant (Wu et al. 2024, "Self-Play Preference Optimization"; TRL's
`sppo_hard`): it pulls the chosen log-ratio to +1/(2b) and the rejected one to -1/(2b),

    L = (r_w - 1/(2b))^2 + (r_l + 1/(2b))^2,   r = log pi(y|x) - log pi_ref(y|x).

By hand, b = 0.5 (so 1/(2b) = 1): r_w = 2, r_l = -1 gives (2 - 1)^2 + (-1 + 1)^2 = 1; r_w = r_l = 0 gives 2.
Before the first update the policy is the reference (LoRA's B starts at zero): every r is 0 and the first step's
loss is 1/(2b^2) = 2.
"""

import pytest
import torch
from safetensors.torch import load_file

from lora_dpo.config import load_recipe
from lora_dpo.core.losses import LOSSES, LossSpec, preference_loss, register_loss
from lora_dpo.errors import ConfigError
from lora_dpo.run.metrics import read_metrics
from lora_dpo.training.loop import train
from tiny import REPO


def sppo_hard(chosen, rejected, beta):
    return (chosen - 1 / (2 * beta)) ** 2 + (rejected + 1 / (2 * beta)) ** 2


@pytest.fixture
def registered():
    spec = register_loss(LossSpec("sppo_hard", sppo_hard, finite_optimum=True))
    yield spec
    del LOSSES[spec.name]


def test_a_registered_loss_gives_its_hand_values(registered):
    t = lambda *v: torch.tensor(v)  # noqa: E731
    out = preference_loss("sppo_hard", t(-10.0, -5.0), t(-15.0, -4.0), t(-12.0, -5.0), t(-14.0, -4.0), beta=0.5)
    torch.testing.assert_close(out.losses, t(1.0, 2.0))  # r = (2, -1) and (0, 0)
    with pytest.raises(ValueError, match="already registered"):
        register_loss(LossSpec("sppo_hard", sppo_hard))


def test_a_registered_loss_is_a_valid_loss_name_and_trains(registered, tmp_path):
    recipe = load_recipe(REPO / "recipes" / "toy.yaml", [f"output_dir={tmp_path / 'run'}", "loss.name=sppo_hard",
                                                         "loss.beta=0.5", "train.max_steps=1", "eval.num_prompts=0",
                                                         "eval.max_pairs=8", "train.save_every=null"])
    final = train(recipe)
    (first,) = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "train"]
    assert first["loss"] == pytest.approx(2.0, abs=1e-4)  # 1/(2b^2): the registered function, nothing else
    assert first["grad_norm"] > 0 and final["skipped_steps"] == 0
    adapter = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    assert any(w.abs().max() > 0 for name, w in adapter.items() if "lora_B" in name)  # B starts at 0: it trained


def test_an_unregistered_name_is_refused_listing_the_registry():
    with pytest.raises(ConfigError, match=r"loss.name: expected one of 'dpo', .*'kto', got 'sppo_hard'"):
        load_recipe(None, ["output_dir=x", "model.name=toy", "data.train=toy", "loss.name=sppo_hard"])
