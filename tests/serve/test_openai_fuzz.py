"""Schema fuzz: schemathesis generates requests from the server's own /openapi.json, valid and invalid ones,
and sends them over loopback. None may get a 5xx, and the server must stay healthy afterwards."""

from __future__ import annotations

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase

from tests.helpers.served_model import MODEL_NAME

#: Generated cases per operation and mode (five operations, two modes): the whole test stays well under 30 s.
CASES = 12
#: Generated answers are cut to this many tokens: the fuzz is about the API, not generation speed.
MAX_TOKENS = 4


def _limit_generation(case: schemathesis.Case) -> None:
    """Chat requests ask the served model, end with a user's question and generate a few tokens."""
    if isinstance(case.body, dict) and case.path == "/v1/chat/completions":
        if isinstance(case.body.get("messages"), list):  # ask the served model (unknown ids: a test of their own)
            case.body["model"] = MODEL_NAME
            case.body["messages"].append({"role": "user", "content": "what shape is there"})
        for field in ("max_tokens", "max_completion_tokens"):
            if isinstance(case.body.get(field), int) and not isinstance(case.body[field], bool):
                case.body[field] = max(1, min(case.body[field], MAX_TOKENS))


@pytest.mark.parametrize(
    "mode",
    [
        pytest.param(schemathesis.GenerationMode.POSITIVE, marks=pytest.mark.slow),  # ~10 s: valid chats generate
        schemathesis.GenerationMode.NEGATIVE,
    ],
)
def test_generated_requests_never_get_a_server_error(start_server, mode):
    server = start_server(max_body_bytes=64 * 1024)
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {operation.path for operation in operations} >= {"/v1/chat/completions", "/v1/models", "/health"}
    if mode == schemathesis.GenerationMode.NEGATIVE:  # only a JSON body can be sent invalid
        operations = [operation for operation in operations if operation.body]
    server_errors: list[str] = []
    chat_statuses: list[int] = []
    with requests.Session() as session:
        for operation in operations:

            @hypothesis.settings(
                max_examples=CASES,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @hypothesis.given(case=operation.as_strategy(mode))
            def call(case: schemathesis.Case) -> None:
                _limit_generation(case)
                response = case.call(base_url=server.url, session=session, timeout=30)
                if case.path == "/v1/chat/completions":
                    chat_statuses.append(response.status_code)
                if response.status_code >= 500:
                    server_errors.append(f"{case.method} {case.path} {case.body!r:.200} -> {response.status_code}")

            call()
    assert not server_errors, server_errors
    assert len(chat_statuses) >= CASES // 2  # the chat route was exercised ...
    expected = {200} if mode == schemathesis.GenerationMode.POSITIVE else {400}
    assert expected & set(chat_statuses), chat_statuses  # ... down to generation (valid) or the checks (invalid)
    health = requests.get(f"{server.url}/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["pending"] == 0


def test_the_schema_states_bounds_in_json_schema_terms_and_no_status_the_server_never_sends(start_server):
    schema = requests.get(f"{start_server().url}/openapi.json", timeout=10).json()
    assert not {"ge", "le"} & _keys(schema)  # pydantic's names; JSON Schema (and client generators) ignore them
    fields = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert fields["max_tokens"]["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": 2**31 - 1}
    assert fields["n"]["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": 1}
    statuses = {status for path in schema["paths"].values() for op in path.values() for status in op["responses"]}
    assert "400" in statuses and "422" not in statuses  # a body it cannot accept gets an OpenAI-shaped 400


def _keys(document) -> set[str]:
    if isinstance(document, dict):
        return set(document) | {key for value in document.values() for key in _keys(value)}
    if isinstance(document, list):
        return {key for value in document for key in _keys(value)}
    return set()
