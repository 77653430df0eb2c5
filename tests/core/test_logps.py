"""sequence_logps must equal the plain full-logits computation, value and gradient."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM

from lora_dpo.core.logps import sequence_logps, token_logps


def _batch(vocab, n=3, t=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, t), generator=g)
    attn = torch.ones(n, t, dtype=torch.long)
    attn[1, 9:] = 0  # right padding on one row
    loss_mask = torch.zeros(n, t, dtype=torch.bool)
    loss_mask[0, 5:] = True
    loss_mask[1, 4:9] = True
    loss_mask[2, 11:] = True  # a one-token completion
    return ids, attn, loss_mask


def _naive(model, ids, attn, loss_mask):
    """The textbook computation: full [N, T, V] logits, log_softmax, gather, masked sum."""
    logits = model(input_ids=ids, attention_mask=attn).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (lp * loss_mask[:, 1:]).sum(-1)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
@pytest.mark.parametrize("chunk", [1024, 3])  # 3 splits the completion tokens across chunk boundaries
def test_sequence_logps_equal_full_logits_values_and_gradients(request, fixture, chunk):
    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(fixture))
    ids, attn, mask = _batch(model.config.vocab_size)
    ours = sequence_logps(model, ids, attn, mask, chunk_tokens=chunk)
    ours.sums.sum().backward()
    grads_ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    naive = _naive(model, ids, attn, mask)
    naive.sum().backward()
    torch.testing.assert_close(ours.sums, naive, rtol=1e-5, atol=1e-5)
    assert ours.counts.tolist() == [7.0, 5.0, 1.0]  # positions 5..11, 4..8, 11
    for a, p in zip(grads_ours, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)


def test_sequence_logps_apply_gemma2_logit_softcapping():
    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=2.0)
    model = Gemma2ForCausalLM(cfg).eval()
    with torch.no_grad():  # large head weights so that the cap matters
        model.lm_head.weight.mul_(50)
    ids, attn, mask = _batch(64)
    ours = sequence_logps(model, ids, attn, mask)
    torch.testing.assert_close(ours.sums, _naive(model, ids, attn, mask), rtol=1e-5, atol=1e-5)


def test_token_logps_chunks_do_not_change_values():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    h = torch.randn(10, 8)
    t = torch.randint(0, 50, (10,))
    expected = F.log_softmax(head(h), -1).gather(-1, t[:, None]).squeeze(-1)
    for chunk in (1, 4, 10, 100):
        torch.testing.assert_close(token_logps(h, t, head, chunk_tokens=chunk), expected)


def test_averaged_divides_by_completion_tokens():
    from lora_dpo.core.logps import SequenceLogps

    s = SequenceLogps(sums=torch.tensor([-6.0, -3.0]), counts=torch.tensor([3.0, 1.0]))
    assert s.averaged().tolist() == [-2.0, -3.0]


def test_a_chunk_of_logits_stays_within_the_byte_budget_whatever_the_vocabulary():
    """Peak memory must not grow with the vocabulary: chunks shrink as the vocabulary grows."""
    from lora_dpo.core.logps import LOGITS_BUDGET_BYTES, chunk_tokens_for

    for vocab in (8000, 32000, 128256, 151936, 256000):
        chunk = chunk_tokens_for(vocab)
        assert chunk * vocab * 4 <= LOGITS_BUDGET_BYTES < (chunk + 1) * vocab * 4
    assert chunk_tokens_for(10**12) == 1  # never zero
