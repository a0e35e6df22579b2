"""Shared fixtures: tiny models and a tiny tokenizer built in-process (no downloads)."""

from __future__ import annotations

import pytest
import torch

from mmadapter.adapters.backbones.presets import base_config, build_base_model

# ChatGLM's tiny model and sentencepiece tokenizer are shared by the adapters, train and serve tests.
pytest_plugins = ("tests.chatglm_fixtures",)

TINY_WORDS = (
    "the a red green blue yellow circle square triangle small large left right top bottom image "
    "what colour shape is there one two three below instruction response input describe answer"
).split()


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

    def build(gqa: bool = False, attn: str = "sdpa", dtype: torch.dtype | None = None, seed: int = 0):
        torch.manual_seed(seed)
        model = build_base_model(base_config("tiny-llama-gqa" if gqa else "tiny-llama"), dtype=dtype)
        model.set_attn_implementation(attn)
        return model.requires_grad_(False)

    return build


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer trained in a second on a handful of words, LLaMA-style specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=256,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = [" ".join(TINY_WORDS[i:] + TINY_WORDS[:i]) for i in range(len(TINY_WORDS))]
    tokenizer.train_from_iterator(text * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
    )
