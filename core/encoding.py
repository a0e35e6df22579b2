"""Examples to token ids and labels, with the loss only on response tokens (labels -100 elsewhere).

As the official LLaMA-Adapter code (alpaca_finetuning_v1/finetuning.py): the whole text (prompt +
response) is tokenized once, BOS first and EOS after the response, and the prompt's token count
(from tokenizing the prompt alone) marks where labels start; the result is cut at max_length.
Multi-turn conversations render every reply's prompt with the template's history, and every
reply (followed by EOS) is trained on.
"""

from __future__ import annotations

import dataclasses
import sys

from mmadapter.core.examples import DataError, Example
from mmadapter.core.templates import PromptTemplate

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


def encode(
    example: Example, tokenizer, template: PromptTemplate, *, max_length: int, caption_instruction: str
) -> Encoded:
    """Token ids and labels of one example; raises DataError when no reply token fits in max_length."""
    text, spans = render(example, template, caption_instruction)

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
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    # Labels are shifted by one in the loss: the first position never counts.
    if all(label == IGNORE_INDEX for label in labels[1:]):
        raise DataError(f"no response tokens within max_length={max_length} (the prompt alone is too long)")
    return Encoded(input_ids, labels)


def encode_prompt(example: Example, tokenizer, template: PromptTemplate, *, caption_instruction: str = "") -> list[int]:
    """The ids training puts before the last reply, the reply left out: what generation must start from
    (evaluation and serving), so a trained adapter is asked exactly as it learned (EOS after earlier replies)."""
    question, _ = example.turns[-1]
    open_turn = dataclasses.replace(example, turns=(*example.turns[:-1], (question, "")))
    encoded = encode(open_turn, tokenizer, template, max_length=sys.maxsize, caption_instruction=caption_instruction)
    return encoded.input_ids[:-1]  # without the EOS that would end the (empty) reply
