"""The 4-bit base + LoRA policy, its adapter-disabled reference, and the bitsandbytes CPU trap guard."""

import bitsandbytes.functional as bnbF
import pytest
import torch
from bitsandbytes.nn import Linear4bit
from bitsandbytes.nn.modules import has_avx512bf16
from transformers import AutoModelForCausalLM

from lora_dpo.config import LoraConfig, ModelConfig
from lora_dpo.core.logps import sequence_logps
from lora_dpo.model.adapters import attach_lora, load_policy, reference_model
from lora_dpo.model.load import load_tokenizer

CPU = torch.device("cpu")


def _inputs(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 10), generator=g)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[:, 4:] = True
    return ids, torch.ones_like(ids), mask


def _randomise_lora(model, seed=1):
    """peft starts lora_B at zero; give both factors values so gradients reach every LoRA parameter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _dequantized_twin(path, model4):
    """A float32 copy of the base whose linear weights are exactly the 4-bit weights, dequantized."""
    twin = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    twin_modules = dict(twin.named_modules())
    for name, module in model4.get_base_model().named_modules():
        if isinstance(module, Linear4bit):
            w = bnbF.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
            twin_modules[name.replace(".base_layer", "")].weight.data.copy_(w)
    return twin


def _copy_lora(src, dst):
    lora = {k: v for k, v in src.state_dict().items() if "lora_" in k}
    missing = dst.load_state_dict(lora, strict=False)
    assert not missing.unexpected_keys


def _lora_grads(model, ids, attn, mask):
    model.zero_grad()
    model.train()
    sequence_logps(model, ids, attn, mask).sums.sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _policy(path, r=4):
    return load_policy(ModelConfig(name=str(path)), LoraConfig(r=r, alpha=8, dropout=0.0), CPU)


def test_base_loads_in_4bit_nf4_with_only_the_adapter_trainable(tiny_llama):
    model = _policy(tiny_llama)
    linears = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(linears) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers; lm_head stays unquantised
    assert linears[0].weight.quant_state.quant_type == "nf4"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 7 * 2  # A and B for every linear layer ("all-linear" skips the output head)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_lora_gradients_through_4bit_equal_float32_on_dequantized_weights_after_reference_and_generation(
    request, fixture
):
    path = request.getfixturevalue(fixture)
    model4 = _policy(path)
    _randomise_lora(model4)
    twin = attach_lora(_dequantized_twin(path, model4), LoraConfig(r=4, alpha=8, dropout=0.0), False)
    _copy_lora(model4, twin)
    ids, attn, mask = _inputs(model4.config.vocab_size)

    # the passes that trigger the trap: a no-grad eval-mode reference pass, then a generation
    model4.eval()
    with reference_model(model4):
        sequence_logps(model4, ids, attn, mask)
    model4.generate(input_ids=ids[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)

    got, want = _lora_grads(model4, ids, attn, mask), _lora_grads(twin, ids, attn, mask)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=2e-3, atol=1e-5, msg=name)


@pytest.mark.skipif(not has_avx512bf16(), reason="the trap exists only on CPUs with AVX512-BF16")
def test_without_the_guard_gradients_are_wrong_on_this_cpu(tiny_llama):
    """Shows the test above can fail: re-enable the repacking and the same comparison breaks."""
    model4 = _policy(tiny_llama)
    for m in model4.modules():
        if isinstance(m, Linear4bit):
            m.support_avx512bf16_for_cpu = True
    _randomise_lora(model4)
    twin = attach_lora(_dequantized_twin(tiny_llama, model4), LoraConfig(r=4, alpha=8, dropout=0.0), False)
    _copy_lora(model4, twin)
    ids, attn, mask = _inputs(model4.config.vocab_size)
    model4.eval()
    with reference_model(model4):
        sequence_logps(model4, ids, attn, mask)
    got, want = _lora_grads(model4, ids, attn, mask), _lora_grads(twin, ids, attn, mask)
    assert any(not torch.allclose(got[n], want[n], rtol=2e-3, atol=1e-5) for n in want)


def test_reference_is_the_base_with_adapter_disabled(tiny_qwen2):
    model = _policy(tiny_qwen2)
    _randomise_lora(model)
    ids, attn, mask = _inputs(model.config.vocab_size)
    model.eval()
    with reference_model(model):
        ref = sequence_logps(model, ids, attn, mask).sums
    with torch.no_grad():
        policy = sequence_logps(model, ids, attn, mask).sums
        bare = sequence_logps(model.get_base_model(), ids, attn, mask).sums  # adapters still injected
    assert not torch.allclose(policy, ref)  # the adapter changes the policy...
    assert torch.equal(policy, bare)
    with torch.no_grad():  # ...and zeroing it gives back exactly the reference
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.zero_()
        zeroed = sequence_logps(model, ids, attn, mask).sums
    torch.testing.assert_close(zeroed, ref)


def test_tokenizer_without_pad_token_gets_eos_as_pad_and_right_padding(tiny_llama):
    tok = load_tokenizer(ModelConfig(name=str(tiny_llama)))
    assert tok.pad_token == tok.eos_token == "<|eot_id|>"
    assert tok.padding_side == "right"


def test_missing_model_is_a_config_error_naming_the_key(tmp_path):
    from lora_dpo.errors import ConfigError

    with pytest.raises(ConfigError, match="model.name"):
        load_tokenizer(ModelConfig(name=str(tmp_path / "nope")))


def test_quantization_none_loads_float32_linear_layers(tiny_llama):
    model = load_policy(ModelConfig(name=str(tiny_llama), quantization="none"), LoraConfig(r=2), CPU)
    assert not any(isinstance(m, Linear4bit) for m in model.modules())
    assert model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.float32
