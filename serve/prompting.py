"""Prompt token ids exactly as training built them, so a served adapter sees what it learned on.

LLaMA-style: `mmadapter.core.encoding.encode_prompt`, the training encoding without the last reply
(BOS, the rendered conversation tokenized once, EOS after every finished assistant reply). ChatGLM-6B (spec
chatglm-6b-ptuning-v2 §2.8, §4): the rendered rounds tokenized, then `[gMASK] <sop>`.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from mmadapter.core.encoding import encode_prompt
from mmadapter.core.examples import Example
from mmadapter.core.templates import PromptTemplate


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
    if uses_glm_layout(model_type):
        return encode_text(tokenizer, model_type, template.render(message, history=tuple(history)))
    return encode_prompt(Example(source="chat", turns=(*history, (message, ""))), tokenizer, template)
