"""Examples to token ids and labels, with the loss only on response tokens (labels -100 elsewhere).

Official templates, as the official LLaMA-Adapter code (alpaca_finetuning_v1/finetuning.py): the whole
text (prompt + response) is tokenized once, BOS first and EOS after the response, and the prompt's token
count (from tokenizing the prompt alone) marks where labels start; the result is cut at max_length.
Multi-turn conversations render every reply's prompt with the template's history, and every reply
(followed by EOS) is trained on. These templates have no system slot: a system message leads the first
user message, as the OpenAI API front end does.

A tokenizer's chat template: the ids are exactly `apply_chat_template(messages)` (its text tokenized
without added special tokens: the template writes BOS itself where it wants one). Labels cover each
assistant turn: from the end of `apply_chat_template(messages before it, add_generation_prompt=True)`,
which must tokenize as a prefix of the whole (it is what serving sends), through the reply and the
end-of-turn token right after it. transformers' `return_assistant_tokens_mask` would need `{% generation %}`
markers, which the Llama 3, Mistral and Qwen templates do not have (the mask comes back all zeros).
"""

from __future__ import annotations

import dataclasses
import sys

from mmadapter.core.chat_templates import ChatTemplate, Message, chat_messages, render_chat
from mmadapter.core.examples import DataError, Example
from mmadapter.core.templates import PromptTemplate, Template

IGNORE_INDEX = -100


@dataclasses.dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]


def render(example: Example, template: PromptTemplate, caption_instruction: str) -> tuple[str, list[tuple[int, int]]]:
    """The full text and the (start, end) character spans of every reply in it."""
    if example.caption:
        text = template.render(caption_instruction)
        return text + example.turns[0][1], [(len(text), len(text) + len(example.turns[0][1]))]
    history = list(example.turns[:-1])
    question, reply = example.turns[-1]
    text = template.render(question, example.input if not history else "", history=history) + reply
    spans = []
    for i, (question, reply) in enumerate(example.turns):
        prompt = template.render(question, example.input if i == 0 and not history else "", history=example.turns[:i])
        start = len(prompt)
        if not text.startswith(prompt):
            raise DataError(f"template {template.name!r} does not render turn {i} as a prefix of the conversation")
        end = text.find(reply, start)
        if end < 0:  # pragma: no cover - a template that drops replies from its history
            raise DataError(f"template {template.name!r} does not contain reply {i} in the conversation")
        spans.append((start, end + len(reply)))
    return text, spans


def encode(example: Example, tokenizer, template: Template, *, max_length: int, caption_instruction: str) -> Encoded:
    """Token ids and labels of one example; raises DataError when no reply token fits in max_length."""
    if isinstance(template, ChatTemplate):
        return _encode_chat(example, tokenizer, template, max_length, caption_instruction)
    text, spans = render(system_folded(example), template, caption_instruction)

    def count(offset: int) -> int:
        return len(tokenizer.encode(text[:offset], add_special_tokens=False))

    ids = tokenizer.encode(text, add_special_tokens=False)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    input_ids, labels, cursor = list(bos), [IGNORE_INDEX] * len(bos), 0
    for start, end in spans:
        first, last = count(start), (len(ids) if end == len(text) else count(end))
        input_ids += ids[cursor:first] + ids[first:last] + [tokenizer.eos_token_id]
        labels += [IGNORE_INDEX] * (first - cursor) + ids[first:last] + [tokenizer.eos_token_id]
        cursor = last
    return _truncated(input_ids, labels, max_length)


def _truncated(input_ids: list[int], labels: list[int], max_length: int) -> Encoded:
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    # Labels are shifted by one in the loss: the first position never counts.
    if all(label == IGNORE_INDEX for label in labels[1:]):
        raise DataError(f"no response tokens within max_length={max_length} (the prompt alone is too long)")
    return Encoded(input_ids, labels)


def system_folded(example: Example) -> Example:
    """An official template's example: the system message, if any, leads the first user message."""
    if not example.system:
        return example
    (question, reply), *rest = example.turns
    first = (f"{example.system}\n\n{question}" if question else example.system, reply)
    return dataclasses.replace(example, system="", turns=(first, *rest))


def encode_prompt(example: Example, tokenizer, template: Template, *, caption_instruction: str = "") -> list[int]:
    """The ids training puts before the last reply, the reply left out: what generation must start from
    (evaluation and serving), so a trained adapter is asked exactly as it learned (EOS after earlier replies)."""
    question, _ = example.turns[-1]
    open_turn = dataclasses.replace(example, turns=(*example.turns[:-1], (question, "")))
    if isinstance(template, ChatTemplate):
        return chat_prompt_ids(tokenizer, template, _chat_messages(open_turn, template, caption_instruction))
    encoded = encode(open_turn, tokenizer, template, max_length=sys.maxsize, caption_instruction=caption_instruction)
    return encoded.input_ids[:-1]  # without the EOS that would end the (empty) reply


def chat_prompt_ids(tokenizer, template: ChatTemplate, messages: list[Message]) -> list[int]:
    """`apply_chat_template(messages, add_generation_prompt=True)` with `template`: what asks for the next reply."""
    return _tokens(tokenizer, render_chat(tokenizer, template.source, messages, add_generation_prompt=True))


def _tokens(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _chat_messages(example: Example, template: ChatTemplate, caption_instruction: str) -> list[Message]:
    if example.caption:
        turns = ((caption_instruction, example.turns[0][1]),)
    else:
        (question, reply), *rest = example.turns
        turns = ((f"{question}\n{example.input}" if example.input else question, reply), *rest)
    image = example.image is not None
    return chat_messages(tuple(turns), system=example.system, image=image, image_parts=template.image_parts)


def _encode_chat(example: Example, tokenizer, template: ChatTemplate, max_length: int, caption: str) -> Encoded:
    messages = _chat_messages(example, template, caption)
    text = render_chat(tokenizer, template.source, messages)
    ids = _tokens(tokenizer, text)
    labels = [IGNORE_INDEX] * len(ids)
    replies = [index for index, message in enumerate(messages) if message["role"] == "assistant"]
    for number, index in enumerate(replies):
        start, end = _reply_span(tokenizer, template, messages, index, text, ids, f"reply {number}")
        labels[start:end] = ids[start:end]
    return _truncated(ids, labels, max_length)


def _reply_span(
    tokenizer, template: ChatTemplate, messages: list[Message], index: int, text: str, ids: list[int], which: str
) -> tuple[int, int]:
    """Token positions of the assistant message `index`: after the generation prompt that asks for it, through
    its end-of-turn token."""
    prompt = render_chat(tokenizer, template.source, messages[:index], add_generation_prompt=True)
    if not text.startswith(prompt):
        raise DataError(
            f"the chat template renders the conversation before {which} differently from the whole conversation "
            "(serving would ask for that reply with other text than training saw)"
        )
    start = _prefix_length(ids, _tokens(tokenizer, prompt), f"the generation prompt before {which}")
    content = messages[index]["content"]
    for reply in dict.fromkeys((content, content.strip())):  # some templates trim replies (Llama 3)
        at = text.find(reply + template.end_of_turn, len(prompt))
        if at >= 0 and template.end_of_turn not in text[len(prompt) : at]:  # in this turn, not a later one
            end = at + len(reply) + len(template.end_of_turn)
            return start, _prefix_length(ids, _tokens(tokenizer, text[:end]), f"{which} and its end-of-turn token")
    raise DataError(f"the chat template does not render {which} as written, followed by {template.end_of_turn}")


def _prefix_length(ids: list[int], prefix: list[int], what: str) -> int:
    if ids[: len(prefix)] != prefix:
        raise DataError(f"{what} does not end on a token boundary of the conversation's tokens")
    return len(prefix)
