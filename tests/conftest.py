import atexit
import logging
import os
import shutil
import tempfile

# datasets' cache (read when datasets is imported): the tests' own, not the user's ~/.cache/huggingface
if "HF_DATASETS_CACHE" not in os.environ:
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="lora-dpo-tests-datasets-")
    atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402

from tiny import chatml_tokenizer, llama3_tokenizer, plain_tokenizer, save_random_adapter, save_tiny  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tok_chatml():
    return chatml_tokenizer()


@pytest.fixture(scope="session")
def tok_llama3():
    return llama3_tokenizer()


@pytest.fixture(scope="session")
def tok_plain():
    return plain_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """Path to a saved tiny Llama with a Llama-3-style tokenizer (no pad token)."""
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), arch="llama", tokenizer="llama3")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    """Path to a saved tiny Qwen2 with a ChatML tokenizer."""
    return save_tiny(tmp_path_factory.mktemp("tiny-qwen2"), arch="qwen2", tokenizer="chatml")


@pytest.fixture(scope="session")
def strong_adapter(tmp_path_factory, tiny_qwen2):
    """A LoRA adapter on the tiny Qwen2 whose random B matrices move log-probs by tenths of a nat, so that
    an adapter lost or mangled on the way (a merge, a comparison) shows; tokenizer files beside it."""
    return save_random_adapter(tmp_path_factory.mktemp("strong-adapter"), tiny_qwen2, seed=0)


@pytest.fixture(scope="session")
def other_adapter(tmp_path_factory, tiny_qwen2):
    """A second such adapter on the same base, from another seed."""
    return save_random_adapter(tmp_path_factory.mktemp("other-adapter"), tiny_qwen2, seed=1)


@pytest.fixture(scope="session")
def calibration_model(tmp_path_factory):
    """A 4-layer Llama (hidden 256, MLP 768, vocab 8192) and 8 pairs of 30-200 token prompts and replies."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_dpo.data.pairs import EncodedPair

    folder = tmp_path_factory.mktemp("calibration")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(folder)
    g = torch.Generator().manual_seed(1)
    ids = lambda n: torch.randint(3, 8192, (n,), generator=g).tolist()
    pairs = []
    for i in range(8):
        p, c, r = torch.randint(30, 200, (3,), generator=g).tolist()
        pairs.append(EncodedPair(index=i, prompt="", prompt_ids=ids(p), chosen_ids=ids(c), rejected_ids=ids(r)))
    return folder, pairs
