"""Prompt token ids exactly as training built them, so a served adapter sees what it learned on.

LLaMA-style (mmadapter.train.encoding, after the official Alpaca code): BOS, then the rendered
conversation tokenized once, with EOS after every finished assistant reply. ChatGLM-6B (spec
chatglm-6b-ptuning-v2 §2.8, §4): the rendered rounds tokenized, then `[gMASK] <sop>`.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from mmadapter.train.templates import PromptTemplate


def _tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def uses_glm_layout(model_type: str) -> bool:
    return model_type == "chatglm"


def encode_text(tokenizer: PreTrainedTokenizerBase, model_type: str, text: str) -> list[int]:
    """A raw prompt (no history) -> ids with the model family's special tokens."""
    if uses_glm_layout(model_type):
        return tokenizer.build_inputs_with_special_tokens(_tokens(tokenizer, text))
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + _tokens(tokenizer, text)


def encode_chat(
    tokenizer: PreTrainedTokenizerBase,
    model_type: str,
    template: PromptTemplate,
    message: str,
    history: Sequence[tuple[str, str]] = (),
) -> list[int]:
    """The ids of the prompt that asks for the reply to `message` after `history`."""
    history = tuple(history)
    text = template.render(message, history=history)
    if uses_glm_layout(model_type) or not history:
        return encode_text(tokenizer, model_type, text)
    ids = _tokens(tokenizer, text)
    out = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    cursor = 0
    for index, (question, reply) in enumerate(history):
        start = len(template.render(question, history=history[:index]))
        end = text.find(reply, start) + len(reply)
        cut = len(_tokens(tokenizer, text[:end]))
        out += [*ids[cursor:cut], tokenizer.eos_token_id]
        cursor = cut
    return out + ids[cursor:]
