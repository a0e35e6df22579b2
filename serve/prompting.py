"""Prompt token ids exactly as training built them, so a served adapter sees what it learned on.

LLaMA-style: `mmadapter.core.encoding.encode_prompt`, the training encoding without the last reply
(BOS, the rendered conversation tokenized once, EOS after every finished assistant reply). A chat template:
`apply_chat_template(messages, add_generation_prompt=True)`, which training's ids start with. ChatGLM-6B (spec
chatglm-6b-ptuning-v2 §2.8, §4): the rendered rounds tokenized, then `[gMASK] <sop>`.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from mmadapter.core.chat_templates import ChatTemplate, chat_messages, render_chat
from mmadapter.core.encoding import encode_prompt, render, system_folded
from mmadapter.core.examples import Example
from mmadapter.core.templates import Template


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
    template: Template,
    message: str,
    history: Sequence[tuple[str, str]] = (),
    *,
    system: str = "",
    image: bool = False,
) -> list[int]:
    """The ids of the prompt that asks for the reply to `message` after `history`. `system` is a chat template's
    system turn (the official templates put it before the first question); `image` says the conversation has a
    picture (V2), which a chat template that renders image parts marks in the first question."""
    if not isinstance(template, ChatTemplate) and not uses_glm_layout(model_type):
        # The official templates put EOS after every earlier reply: training's encoding, without the last reply.
        example = Example(source="chat", turns=(*history, (message, "")), system=system)
        return encode_prompt(example, tokenizer, template)
    text = chat_text(tokenizer, model_type, template, message, history, system=system, image=image)
    if isinstance(template, ChatTemplate):
        return _tokens(tokenizer, text)  # apply_chat_template's text, tokenized as training tokenizes it
    return encode_text(tokenizer, model_type, text)


def chat_text(
    tokenizer: PreTrainedTokenizerBase,
    model_type: str,
    template: Template,
    message: str,
    history: Sequence[tuple[str, str]] = (),
    *,
    system: str = "",
    image: bool = False,
) -> str:
    """The text `encode_chat` tokenizes, without the special tokens it adds (BOS, EOS after earlier replies,
    ChatGLM's [gMASK] <sop>): a string operation, so its tokens, counted piece by piece, bound the prompt's
    from below at a cost linear in its length (`serve.api_prompts`)."""
    turns = (*history, (message, ""))
    if isinstance(template, ChatTemplate):
        messages = chat_messages(turns, system=system, image=image, image_parts=template.image_parts)
        return render_chat(tokenizer, template.source, messages, add_generation_prompt=True)
    example = Example(source="chat", turns=turns, system=system)
    if uses_glm_layout(model_type):
        return _glm_text(template, example)
    return render(system_folded(example), template, caption_instruction="")[0]


def _glm_text(template: Template, example: Example) -> str:
    (*past, (question, _)) = system_folded(example).turns
    return template.render(question, history=tuple(past))
