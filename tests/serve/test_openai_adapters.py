"""Several adapters on one base through the HTTP API, driven by the official `openai` client: the request's
`model` picks the adapter, `/v1/models` lists them all, and `adapter_scale` reaches the engine."""

from __future__ import annotations

import openai
import pytest
import requests

from mmadapter.serve.chat import ChatTurn, stream_turn
from mmadapter.serve.loader import BASE_MODEL_ID
from mmadapter.serve.sampling import SamplingParams
from tests.serve.test_batching import folders, multi  # noqa: F401 (module fixtures: the saved adapters, served)
from tests.serve.test_openai_server import client_for, post_chat

QUESTION = "what shape is there"


@pytest.fixture(scope="module")
def two_adapters(request):
    """serve-batch's adapters on one tiny base (V1, V2 with bias/scale and LoRA, LoRA), greedy answers of 6 tokens."""
    served = request.getfixturevalue("multi")
    served.update_defaults(max_new_tokens=6, temperature=0.0)
    return served


def _alone(served, model: str, scale: float = 1.0) -> str:
    """The answer generated in-process, one request alone (the reference the server must match)."""
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    events = list(stream_turn(served, ChatTurn(QUESTION, params=params, adapter=model, adapter_scale=scale)))
    return "".join(event.text for event in events[1:])


def test_the_model_field_picks_the_adapter_and_adapter_scale_reaches_it(two_adapters, start_server):
    server = start_server(two_adapters)
    client = client_for(server)
    assert {model.id for model in client.models.list().data} == {"v1", "v2", "lora", BASE_MODEL_ID}
    health = requests.get(f"{server.url}/health", timeout=10).json()
    assert set(health["models"]) == {"v1", "v2", "lora", BASE_MODEL_ID} and health["model"] == health["models"][0]
    messages = [{"role": "user", "content": QUESTION}]
    answers = {}
    for model in ("v1", "lora", BASE_MODEL_ID):
        answer = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0)
        answers[model] = answer.choices[0].message.content
        assert answers[model] == _alone(two_adapters, model), model
    assert len(set(answers.values())) == 3  # three different models answered
    # adapter_scale is an extension field: the official client sends it through extra_body.
    scaled = client.chat.completions.create(
        model="v1", messages=messages, max_tokens=6, temperature=0, extra_body={"adapter_scale": 0.0}
    )
    assert scaled.choices[0].message.content == _alone(two_adapters, "v1", 0.0) == answers[BASE_MODEL_ID]
    streamed = client.chat.completions.create(
        model="lora", messages=messages, max_tokens=6, temperature=0, stream=True, extra_body={"adapter_scale": 0.5}
    )
    streamed_text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed)  # before the model is
    assert streamed_text == _alone(two_adapters, "lora", 0.5) != answers["lora"]  # used in-process again
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="v3", messages=messages)


def test_adapter_scale_on_a_model_served_as_it_is_is_refused_naming_the_field(start_server):
    """The single-adapter fixture is served without routing (like --merge): only scale 1 is possible."""
    server = start_server()
    status, body = post_chat(server, {**_message_for(server), "adapter_scale": 0.5})
    assert status == 400 and body["error"]["param"] == "adapter_scale"
    assert post_chat(server, {**_message_for(server), "adapter_scale": 1})[0] == 200


def _message_for(server) -> dict:
    return {"model": server.served.name, "messages": [{"role": "user", "content": "hi"}]}
