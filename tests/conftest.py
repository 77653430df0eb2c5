import logging
import os

import pytest
import torch

from tiny import chatml_tokenizer, llama3_tokenizer, plain_tokenizer, save_tiny

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
