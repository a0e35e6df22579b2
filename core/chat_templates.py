"""A base tokenizer's own chat template (Jinja; Llama 3, Mistral, Qwen2/3 ship one) as a prompt template.

transformers' `apply_chat_template` renders it, in its sandboxed Jinja environment. `ChatTemplate` keeps
the template's source text, so an adapter folder records exactly what it was trained with and serving
renders that, whichever tokenizer it loads, and two facts found once by rendering probe conversations:
- the special token that ends an assistant turn (`<|eot_id|>`, `<|im_end|>`, `</s>`): training puts loss
  on it, so the model learns to stop, and serving stops at it;
- whether the template renders typed content parts (`{"type": "image"}`, e.g. Llama 3.2 Vision's
  `<|image|>`): then an image row's first user message carries one where the picture goes. Text-only
  templates print such a list as Python text or fail on it; there the picture enters only as V2's
  visual prompt, as it does with the official templates.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jinja2

from mmadapter.core.examples import DataError

#: Texts of the probe conversations; nothing a template would change (no surrounding whitespace).
PROBE_QUESTION = "mmadapter probe question"
PROBE_REPLY = "mmadapter probe reply"
CHAT = "chat"
"""The template name (`data.template`, `prompt_template`) of a tokenizer's own chat template."""

Message = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template and what the probes found out about it."""

    source: str
    end_of_turn: str
    """The special token right after every assistant reply."""
    end_of_turn_id: int
    image_parts: bool
    """Whether the template renders `{"type": "image"}` content parts."""
    name: str = CHAT
    stop: tuple[str, ...] = ()

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        return (self.end_of_turn_id,)


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_template_of(tokenizer: Any, source: str | None = None) -> ChatTemplate:
    """`source` (default: the tokenizer's own chat template) probed with `tokenizer`; a ValueError says why a
    template cannot be trained with."""
    if source is None:
        if not has_chat_template(tokenizer):
            raise ValueError(
                "the tokenizer has no chat_template; use an official template (alpaca, chatglm, chat65b) or auto"
            )
        source = tokenizer.get_chat_template()
    probe = [{"role": "user", "content": PROBE_QUESTION}, {"role": "assistant", "content": PROBE_REPLY}]
    text = render_chat(tokenizer, source, probe)
    reply = text.find(PROBE_REPLY)
    if reply < 0:
        raise ValueError(f"the chat template leaves out the assistant's reply (it renders {text!r})")
    after = reply + len(PROBE_REPLY)
    end_of_turn = special_token_at(tokenizer, text, after)
    if end_of_turn is None:
        raise ValueError(
            f"the chat template puts no special token right after an assistant reply (it continues "
            f"{text[after : after + 20]!r}), so a model trained with it would not learn where an answer ends; "
            "use an official template (alpaca, chat65b)"
        )
    return ChatTemplate(
        source, end_of_turn, tokenizer.convert_tokens_to_ids(end_of_turn), _renders_images(tokenizer, source)
    )


def special_token_at(tokenizer: Any, text: str, index: int) -> str | None:
    """The (longest) special token of `tokenizer` that `text` has at `index`, if any."""
    matches = [
        t.content for t in tokenizer.added_tokens_decoder.values() if t.special and text.startswith(t.content, index)
    ]
    return max(matches, key=len, default=None)


def _renders_images(tokenizer: Any, source: str) -> bool:
    parts = [{"type": "image"}, {"type": "text", "text": PROBE_QUESTION}]
    try:
        text = render_chat(tokenizer, source, [{"role": "user", "content": parts}], add_generation_prompt=True)
    except DataError:
        return False
    return PROBE_QUESTION in text and "'type'" not in text


def render_chat(tokenizer: Any, source: str, messages: list[Message], *, add_generation_prompt: bool = False) -> str:
    """The template's text for `messages`; a DataError when the template refuses them (its own message, e.g.
    Mistral's "Conversation roles must alternate user/assistant/user/assistant/...")."""
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=source, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except (jinja2.TemplateError, TypeError, KeyError, IndexError) as error:
        raise DataError(f"the chat template cannot render this conversation ({error})") from None


def chat_messages(
    turns: tuple[tuple[str, str], ...], *, system: str = "", image: bool = False, image_parts: bool = False
) -> list[Message]:
    """System, user and assistant messages of a conversation, the last reply left out when it is empty (a
    prompt). With an image and a template that renders image parts, the first user message leads with one."""
    messages: list[Message] = [{"role": "system", "content": system}] if system else []
    for index, (question, reply) in enumerate(turns):
        content: Any = question
        if index == 0 and image and image_parts:
            content = [{"type": "image"}, {"type": "text", "text": question}]
        messages.append({"role": "user", "content": content})
        if reply or index < len(turns) - 1:
            messages.append({"role": "assistant", "content": reply})
    return messages
