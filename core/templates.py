"""Prompt templates, by name, so adapters remember how they were prompted and users never format by hand.

An adapter folder stores the template name (`prompt_template` in mmadapter_config.json); training
renders examples with it and serving renders chats with it. The official templates (alpaca, chatglm,
chat65b) are plain text; `chat` is the base tokenizer's own Jinja chat template (core/chat_templates.py),
whose source the adapter folder records too (`chat_template`); `auto` means `chat` where the tokenizer has
one and the base family's official template elsewhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args

from mmadapter.core.chat_templates import CHAT, ChatTemplate, chat_template_of, has_chat_template

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
#: The example exchange built into the official chat demo's conversation template `v1`
#: (`llama_adapter_v2_chat65b/conversation.py`: `conv_templates["v1"]` is `conv_v1_2`), between the
#: system text and the user's turns of every prompt. The spec (llama-adapter.md §4) only says it exists.
CHAT65B_EXAMPLE: tuple[str, str] = (
    "What are the key differences between renewable and non-renewable energy sources?",
    "Renewable energy sources are those that can be replenished naturally in a relatively short amount of time, "
    "such as solar, wind, hydro, geothermal, and biomass. Non-renewable energy sources, on the other hand, are "
    "finite and will eventually be depleted, such as coal, oil, and natural gas. Here are some key differences "
    "between renewable and non-renewable energy sources:\n"
    "1. Availability: Renewable energy sources are virtually inexhaustible, while non-renewable energy sources "
    "are finite and will eventually run out.\n"
    "2. Environmental impact: Renewable energy sources have a much lower environmental impact than non-renewable "
    "sources, which can lead to air and water pollution, greenhouse gas emissions, and other negative effects.\n"
    "3. Cost: Renewable energy sources can be more expensive to initially set up, but they typically have lower "
    "operational costs than non-renewable sources.\n"
    "4. Reliability: Renewable energy sources are often more reliable and can be used in more remote locations "
    "than non-renewable sources.\n"
    "5. Flexibility: Renewable energy sources are often more flexible and can be adapted to different situations "
    "and needs, while non-renewable sources are more rigid and inflexible.\n"
    "6. Sustainability: Renewable energy sources are more sustainable over the long term, while non-renewable "
    "sources are not, and their depletion can lead to economic and social instability.\n",
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
    """The V2 chat-65B demo's prompt (`Conversation.get_prompt`, separator `###`): the system text, the
    template's built-in example exchange, the earlier turns, then the open "Assistant:" turn."""
    query = f"{instruction}\n{input}" if input else instruction
    turns = "".join(f"Human: {q}###Assistant: {a}###" for q, a in (CHAT65B_EXAMPLE, *history))
    return f"{CHAT65B_SYSTEM}###{turns}Human: {query}###Assistant:"


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    name: str
    render: Callable[..., str]
    """render(instruction, input="", history=()) -> the prompt text the model continues."""
    stop: tuple[str, ...] = ()
    """Strings that end an answer besides the EOS token."""
    stop_token_ids: tuple[int, ...] = ()
    """Tokens that end an answer besides the EOS token (none: these templates are plain text)."""


TEMPLATES: dict[str, PromptTemplate] = {
    "alpaca": PromptTemplate("alpaca", alpaca_prompt, stop=("### Instruction:",)),
    "chatglm": PromptTemplate("chatglm", chatglm_prompt),
    "chat65b": PromptTemplate("chat65b", chat65b_prompt, stop=("###",)),
}


#: Every name a recipe (`data.template`) or a front end (`--template`) may give.
TemplateName = Literal["alpaca", "chatglm", "chat65b", "chat", "auto"]
TEMPLATE_NAMES: tuple[str, ...] = get_args(TemplateName)
AUTO = "auto"
"""`chat` where the tokenizer has a chat template, else the base family's official template."""
#: The official template of each base family (a base served without an adapter, `auto` without a chat template).
OFFICIAL_TEMPLATES = {"chatglm": "chatglm"}
#: Every other family (LLaMA, Llama 3, Mistral, Qwen2/3): the official LLaMA-Adapter template.
OFFICIAL_DEFAULT = "alpaca"


def official_template(model_type: str) -> str:
    return OFFICIAL_TEMPLATES.get(model_type, OFFICIAL_DEFAULT)


def get_template(name: str) -> PromptTemplate:
    if name not in TEMPLATES:
        raise ValueError(f"unknown prompt template {name!r}; available: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]


#: What a template name stands for once the tokenizer is known.
Template = PromptTemplate | ChatTemplate


def concrete_template_name(name: str, tokenizer: Any, model_type: str, chat_template: str | None = None) -> str:
    """`name` with `auto` decided: `chat` when there is a chat template (the tokenizer's, or `chat_template`,
    an adapter's recorded one), else the official template of the base family `model_type`."""
    if name != AUTO:
        return name
    return CHAT if chat_template or has_chat_template(tokenizer) else official_template(model_type)


def resolve_template(name: str, tokenizer: Any, model_type: str, chat_template: str | None = None) -> Template:
    """The template `name` means with this tokenizer and base family; `chat_template` (an adapter's recorded
    source) replaces the tokenizer's own for `chat`."""
    name = concrete_template_name(name, tokenizer, model_type, chat_template)
    return chat_template_of(tokenizer, chat_template) if name == CHAT else get_template(name)


def template_record(name: str, tokenizer: Any) -> dict[str, str | None]:
    """What an adapter folder records of its template (save_adapter's keyword arguments): the name, and for
    `chat` the tokenizer's Jinja source, so serving renders exactly what training did."""
    return {"prompt_template": name, "chat_template": tokenizer.get_chat_template() if name == CHAT else None}
