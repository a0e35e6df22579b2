"""The `chat65b` template is the prompt of the official chat demo (`llama_adapter_v2_chat65b/chat_demo.py`).

The demo starts from `conv_templates["v1"]` of `llama_adapter_v2_chat65b/conversation.py` (that is
`conv_v1_2`), appends ("Human", query) and ("Assistant", None), and calls `get_prompt()`: the system text
and `###`, then `role + ": " + message + "###"` per message with text, and `role + ":"` for the open one.
Its messages start with the built-in example exchange below, written out here from that file.
"""

from __future__ import annotations

from mmadapter.core.templates import get_template

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
EXAMPLE = [
    ("Human", "What are the key differences between renewable and non-renewable energy sources?"),
    (
        "Assistant",
        "Renewable energy sources are those that can be replenished naturally in a relatively "
        "short amount of time, such as solar, wind, hydro, geothermal, and biomass. "
        "Non-renewable energy sources, on the other hand, are finite and will eventually be "
        "depleted, such as coal, oil, and natural gas. Here are some key differences between "
        "renewable and non-renewable energy sources:\n"
        "1. Availability: Renewable energy sources are virtually inexhaustible, while non-renewable "
        "energy sources are finite and will eventually run out.\n"
        "2. Environmental impact: Renewable energy sources have a much lower environmental impact "
        "than non-renewable sources, which can lead to air and water pollution, greenhouse gas emissions, "
        "and other negative effects.\n"
        "3. Cost: Renewable energy sources can be more expensive to initially set up, but they typically "
        "have lower operational costs than non-renewable sources.\n"
        "4. Reliability: Renewable energy sources are often more reliable and can be used in more remote "
        "locations than non-renewable sources.\n"
        "5. Flexibility: Renewable energy sources are often more flexible and can be adapted to different "
        "situations and needs, while non-renewable sources are more rigid and inflexible.\n"
        "6. Sustainability: Renewable energy sources are more sustainable over the long term, while "
        "non-renewable sources are not, and their depletion can lead to economic and social instability.\n",
    ),
]


def official_prompt(history: list[tuple[str, str]], query: str) -> str:
    """`Conversation.get_prompt` (SINGLE style, sep `###`) after the demo's two `append_message` calls."""
    messages = [*EXAMPLE]
    for question, answer in history:
        messages += [("Human", question), ("Assistant", answer)]
    messages += [("Human", query), ("Assistant", None)]
    prompt = SYSTEM + "###"
    for role, message in messages:
        prompt += f"{role}: {message}###" if message else f"{role}:"
    return prompt


def test_first_turn_is_the_official_prompt_with_the_example_exchange():
    template = get_template("chat65b")
    assert template.render("Give three tips for staying healthy.") == official_prompt(
        [], "Give three tips for staying healthy."
    )
    assert template.stop == ("###",)  # the demo cuts the reply at conv.sep


def test_later_turns_follow_the_example_and_the_earlier_turns():
    history = [("Hello", "Hi! How can I help?"), ("Name a colour.", "Blue.")]
    assert get_template("chat65b").render("And another?", history=history) == official_prompt(history, "And another?")
