"""Turning OpenAI chat requests into chat turns (pure functions, no server)."""

from __future__ import annotations

import pytest

from mmadapter.serve.openai_api import APIError, conversation, sampling_params
from mmadapter.serve.sampling import SamplingParams


def test_messages_become_history_and_the_new_question():
    message, history, images = conversation(
        [
            {"role": "system", "content": "Answer briefly."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what shape"},
                    {"type": "image_url", "image_url": {"url": "data:x"}},
                ],
            },
            {"role": "assistant", "content": "a circle"},
            {"role": "user", "content": "what colour"},
            {"role": "user", "content": [{"type": "text", "text": "one word"}]},
        ]
    )
    assert message == "what colour\none word"
    assert history == [("Answer briefly.\n\nwhat shape", "a circle")]
    assert images == [("data:x", "messages[1].content[1].image_url")]


def test_system_only_prefix_and_assistant_first():
    message, history, _ = conversation(
        [{"role": "developer", "content": "Be kind."}, {"role": "user", "content": "hi"}]
    )
    assert (message, history) == ("Be kind.\n\nhi", [])
    message, history, _ = conversation([{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "hi"}])
    assert (message, history) == ("hi", [("", "Hello!")])


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ("hi", "messages"),
        ([{"role": "user", "content": None}], "messages[0].content"),
        ([{"role": "user", "content": [{"type": "audio"}]}], "messages[0].content[0]"),
        (
            [
                {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "data:x"}}]},
                {"role": "user", "content": "x"},
            ],
            "messages[0].content[0]",
        ),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "messages[0].content[0].image_url"),
    ],
)
def test_bad_messages_name_the_field(messages, param):
    with pytest.raises(APIError) as error:
        conversation(messages)
    assert error.value.status == 400 and error.value.param == param


def test_sampling_fields_override_the_model_defaults():
    defaults = SamplingParams(max_new_tokens=256, temperature=0.1, top_p=0.75, stop=("###",))
    params = sampling_params(
        {
            "max_tokens": 9,
            "temperature": 0,
            "top_p": 0.5,
            "top_k": 3,
            "seed": 4,
            "stop": ["A", "B"],
            "presence_penalty": 0,
        },
        defaults,
    )
    assert params == SamplingParams(
        max_new_tokens=9, temperature=0.0, top_p=0.5, top_k=3, seed=4, stop=("###", "A", "B")
    )
    assert sampling_params({}, defaults) == defaults
    assert sampling_params({"max_completion_tokens": 5, "max_tokens": 7}, defaults).max_new_tokens == 5
    for bad in (
        {"temperature": True},
        {"top_p": 0},
        {"stop": ["a"] * 5},
        {"stop": [""]},
        {"seed": 2**64},
        {"frequency_penalty": 1},
    ):
        with pytest.raises(APIError):
            sampling_params(bad, defaults)
