"""Activation offloading only moves saved tensors: LoRA gradients through the 4-bit base are unchanged."""

import pytest
import torch

from lora_dpo.config import LoraConfig, ModelConfig
from lora_dpo.data.batches import collate

from lora_dpo.core.logps import sequence_logps
from lora_dpo.model.adapters import load_policy
from lora_dpo.model.offload import activation_offload
from tiny import random_pairs as make_pairs


def lora_grads(policy, batch, offload, device):
    policy.zero_grad()
    with activation_offload(offload, device):
        out = sequence_logps(policy, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    out.sums.sum().backward()  # backward outside the context, as in the trainer
    return {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_gradients_with_activation_offload_equal_those_without(tiny_llama, device):
    device = torch.device(device)
    policy = load_policy(ModelConfig(name=str(tiny_llama), gradient_checkpointing=True),
                         LoraConfig(r=4, dropout=0.0), device)
    torch.manual_seed(0)
    for name, p in policy.named_parameters():  # B != 0, so that every LoRA parameter gets a gradient
        if "lora_B" in name:
            p.data.normal_(std=0.1)
    policy.train()
    batch = {k: v.to(device) for k, v in collate(make_pairs(policy.config.vocab_size), pad_id=0).items()}
    plain = lora_grads(policy, batch, False, device)
    offloaded = lora_grads(policy, batch, True, device)
    assert plain and all(g.abs().sum() > 0 for g in plain.values())
    for name in plain:
        torch.testing.assert_close(offloaded[name], plain[name], rtol=0, atol=0)


@pytest.mark.gpu
def test_embeddings_on_cpu_free_the_table_on_the_gpu_and_change_no_gradient(tiny_llama):
    from lora_dpo.model.offload import embeddings_on_cpu

    device = torch.device("cuda")
    policy = load_policy(ModelConfig(name=str(tiny_llama), gradient_checkpointing=True),
                         LoraConfig(r=4, dropout=0.0), device)
    torch.manual_seed(0)
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            p.data.normal_(std=0.1)
    policy.train()
    batch = {k: v.to(device) for k, v in collate(make_pairs(policy.config.vocab_size), pad_id=0).items()}
    on_gpu = lora_grads(policy, batch, False, device)
    table = policy.get_input_embeddings().weight
    before = torch.cuda.memory_allocated(device)
    freed = embeddings_on_cpu(policy, device)
    assert freed == table.numel() * table.element_size() > 0
    assert before - torch.cuda.memory_allocated(device) == freed
    assert policy.get_input_embeddings().weight.device.type == "cpu"
    on_cpu = lora_grads(policy, batch, False, device)
    for name in on_gpu:
        torch.testing.assert_close(on_cpu[name], on_gpu[name], rtol=0, atol=0)


def test_embeddings_on_cpu_do_nothing_when_the_table_is_in_cpu_memory_already(tiny_llama):
    from lora_dpo.model.offload import embeddings_on_cpu

    policy = load_policy(ModelConfig(name=str(tiny_llama)), LoraConfig(r=4), torch.device("cpu"))
    assert embeddings_on_cpu(policy, torch.device("cuda")) == 0  # already in CPU memory
    assert embeddings_on_cpu(policy, torch.device("cpu")) == 0
