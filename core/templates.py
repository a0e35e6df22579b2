"""Prompt templates, by name, so adapters remember how they were prompted and users never format by hand.

An adapter folder stores the template name (`prompt_template` in mmadapter_config.json); training
renders examples with it and serving renders chats with it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
CHAT65B_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

#: A finished exchange: (user message, assistant reply).
Turn = tuple[str, str]


def alpaca_prompt(instruction: str, input: str = "", history: Sequence[Turn] = ()) -> str:
    """The official Alpaca template (spec §1.6); the prompt ends at "### Response:" with no space.

    Earlier turns, if any, are rendered as finished Alpaca exchanges before the new one.
    """
    past = "".join(alpaca_prompt(q) + a + "\n\n" for q, a in history)
    if input:
        return past + ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
    return past + ALPACA_NO_INPUT.format(instruction=instruction)


def chatglm_rounds(query: str, history: Sequence[Turn]) -> str:
    """ChatGLM-6B's round format: `[Round i]\\n问：q\\n答：r\\n` per past turn, then the open round."""
    past = "".join(f"[Round {i}]\n问：{q}\n答：{r}\n" for i, (q, r) in enumerate(history))
    return past + f"[Round {len(history)}]\n问：{query}\n答："


def chatglm_prompt(instruction: str, input: str = "", history: Sequence[Turn] = ()) -> str:
    """ChatGLM-6B's `chat()` prompt: the bare query on the first turn, the round format after."""
    query = f"{instruction}\n{input}" if input else instruction
    return chatglm_rounds(query, history) if history else query


def chat65b_prompt(instruction: str, input: str = "", history: Sequence[Turn] = ()) -> str:
    """The V2 chat-65B conversation format (`###` separated Human/Assistant turns)."""
    query = f"{instruction}\n{input}" if input else instruction
    turns = "".join(f"Human: {q}###Assistant: {a}###" for q, a in history)
    return f"{CHAT65B_SYSTEM}###{turns}Human: {query}###Assistant:"


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    name: str
    render: Callable[..., str]
    """render(instruction, input="", history=()) -> the prompt text the model continues."""
    stop: tuple[str, ...] = ()
    """Strings that end an answer besides the EOS token."""


TEMPLATES: dict[str, PromptTemplate] = {
    "alpaca": PromptTemplate("alpaca", alpaca_prompt, stop=("### Instruction:",)),
    "chatglm": PromptTemplate("chatglm", chatglm_prompt),
    "chat65b": PromptTemplate("chat65b", chat65b_prompt, stop=("###",)),
}


def get_template(name: str) -> PromptTemplate:
    if name not in TEMPLATES:
        raise ValueError(f"unknown prompt template {name!r}; available: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]
