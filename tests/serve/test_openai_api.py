"""Turning OpenAI chat requests into chat turns (pydantic models and pure functions, no server)."""

from __future__ import annotations

import json
import math

import pytest
from pydantic import ValidationError

from mmadapter.serve.api_models import ChatCompletionRequest
from mmadapter.serve.openai_api import APIError, conversation, sampling_params
from mmadapter.serve.sampling import SamplingParams


def request(messages=None, **fields) -> ChatCompletionRequest:
    messages = messages if messages is not None else [{"role": "user", "content": "hi"}]
    return ChatCompletionRequest.model_validate({"model": "m", "messages": messages, **fields})


def test_messages_become_history_and_the_new_question():
    chat = conversation(
        request(
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
        ).messages
    )
    assert chat.message == "what colour\none word"
    assert chat.history == [("what shape", "a circle")]
    assert chat.system == "Answer briefly."  # the template puts it (official ones: before the first question)
    assert chat.images == [("data:x", "messages[1].content[1].image_url")]


def test_developer_is_system_and_assistant_first():
    messages = [
        {"role": "developer", "content": "Be kind."},
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
    ]
    chat = conversation(request(messages).messages)
    assert (chat.message, chat.history, chat.system) == ("hi", [], "Be kind.\n\nBe brief.")
    messages = [{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "hi"}]
    chat = conversation(request(messages).messages)
    assert (chat.message, chat.history, chat.system) == ("hi", [("", "Hello!")], "")


def test_an_image_in_an_assistant_message_names_the_part():
    messages = [
        {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "data:x"}}]},
        {"role": "user", "content": "x"},
    ]
    with pytest.raises(APIError) as error:
        conversation(request(messages).messages)
    assert error.value.status == 400 and error.value.param == "messages[0].content[0]"


def _loc_of(payload) -> tuple:
    with pytest.raises(ValidationError) as error:
        ChatCompletionRequest.model_validate(payload)
    return error.value.errors()[0]["loc"]


@pytest.mark.parametrize(
    ("messages", "loc_start"),
    [
        ("hi", ("messages",)),
        ([], ("messages",)),
        ([{"role": "user", "content": None}], ("messages", 0, "content")),
        ([{"role": "tool", "content": "x"}], ("messages", 0, "role")),
        ([{"role": "user", "content": [{"type": "audio"}]}], ("messages", 0, "content")),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], ("messages", 0, "content")),
        ([{"role": "user", "content": [{"type": "text"}]}], ("messages", 0, "content")),
        ([{"role": "user", "content": "\ud800"}], ("messages", 0, "content")),
    ],
)
def test_bad_messages_are_refused_at_the_field(messages, loc_start):
    assert _loc_of({"model": "m", "messages": messages})[: len(loc_start)] == loc_start


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", True),
        ("temperature", "0.5"),
        ("temperature", 2.5),
        ("top_p", 0),
        ("max_tokens", 0),
        ("max_tokens", 1.5),
        ("stop", ["a"] * 5),
        ("stop", [""]),
        ("seed", 2**64),
        ("n", 2),
        ("frequency_penalty", 1),
        ("logprobs", True),
        ("tools", [{"type": "function"}]),
        ("response_format", {"type": "json_object"}),
        ("adapter_scale", 1.5),
        ("adapter_scale", -0.1),
        ("stream", "yes"),
        ("model", ""),
    ],
)
def test_bad_fields_are_refused_naming_the_field(field, value):
    assert _loc_of({"model": "m", "messages": [{"role": "user", "content": "hi"}], field: value})[0] == field


def test_json_nan_is_refused_as_it_arrives():
    """JSON's NaN literal decodes to a float in Python; the model refuses it like any out-of-range number."""
    payload = json.loads('{"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}')
    assert _loc_of(payload) == ("temperature",)


def test_sampling_fields_override_the_model_defaults():
    defaults = SamplingParams(max_new_tokens=256, temperature=0.1, top_p=0.75, stop=("###",))
    fields = {"max_tokens": 9, "temperature": 0, "top_p": 0.5, "top_k": 3, "seed": 4, "stop": ["A", "B"]}
    params = sampling_params(request(**fields, presence_penalty=0, adapter_scale=0.5), defaults)
    assert params == SamplingParams(
        max_new_tokens=9, temperature=0.0, top_p=0.5, top_k=3, seed=4, stop=("###", "A", "B")
    )
    assert sampling_params(request(), defaults) == defaults
    assert sampling_params(request(max_completion_tokens=5, max_tokens=7), defaults).max_new_tokens == 5
    assert sampling_params(request(stop="END"), defaults).stop == ("###", "END")
