"""Fixtures every test folder shares: tiny models and tokenizers built in-process (no downloads)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings

from tests.helpers.tiny_chatglm import build_tiny_glm, train_glm_vocab
from tests.helpers.tiny_llama import build_tiny_llama
from tests.helpers.tiny_tokenizer import build_tiny_tokenizer

# Property tests draw the same examples on every run, so CI's verdict is reproducible and a slow, loaded machine
# does not fail them; `pytest --hypothesis-profile explore` draws new ones (and saves failures to replay).
settings.register_profile("reproducible", derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("explore", suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("reproducible")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def tiny_llama():
    """Factory for a seeded random tiny LLaMA: `tiny_llama(gqa=True, attn="eager", dtype=...)`."""
    return build_tiny_llama


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture
def tiny_glm():
    """Factory for a seeded random tiny ChatGLM-6B: `tiny_glm(attn="sdpa", dtype=...)`."""
    return build_tiny_glm


@pytest.fixture(scope="session")
def glm_vocab_file(tmp_path_factory):
    return train_glm_vocab(tmp_path_factory.mktemp("ice_text"))


@pytest.fixture(scope="session")
def glm_tokenizer(glm_vocab_file):
    from mmadapter.adapters.backbones.chatglm import ChatGLMTokenizer

    return ChatGLMTokenizer(str(glm_vocab_file))
