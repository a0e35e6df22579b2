"""The operator's limits and the bad requests of issue 13, against a live server on loopback.

Each bad request gets a 4xx with an OpenAI-shaped error naming the parameter, and the server keeps serving; slow
clients are cut off by the header and body deadlines; the body limit answers before the body is read; the
connection cap refuses the connection beyond it; the key never reaches the log; /metrics counts what happened.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time

import pytest

from mmadapter.serve.api_prompts import tokens_at_least
from tests.helpers.served_model import MODEL_NAME
from tests.serve.test_openai_server import _assert_openai_error, _message, post_chat, raw_request

HI = {"role": "user", "content": "hi"}


def _raw_body(text: str) -> bytes:
    return text.encode()


BAD_REQUESTS = {
    # JSON's NaN literal: Python's json module decodes it, the model refuses it.
    "temperature NaN": (
        _raw_body(f'{{"model": "{MODEL_NAME}", "messages": [{json.dumps(HI)}], "temperature": NaN}}'),
        "temperature",
    ),
    "temperature Infinity": (
        _raw_body(f'{{"model": "{MODEL_NAME}", "messages": [{json.dumps(HI)}], "temperature": Infinity}}'),
        "temperature",
    ),
    # A lone surrogate: valid JSON escape, but no valid text.
    "lone surrogate in a message": (
        _raw_body(f'{{"model": "{MODEL_NAME}", "messages": [{{"role": "user", "content": "a \\ud800 b"}}]}}'),
        "messages[0].content",
    ),
    "lone surrogate in a text part": (
        _raw_body(
            f'{{"model": "{MODEL_NAME}", "messages": [{{"role": "user", "content": [{{"type": "text", "text": "\\udfff"}}]}}]}}'
        ),
        "messages[0].content[0].text",
    ),
    "temperature as a string": ({**_message("hi"), "temperature": "0.5"}, "temperature"),
    "max_tokens as a boolean": ({**_message("hi"), "max_tokens": True}, "max_tokens"),
    "max_tokens fractional": ({**_message("hi"), "max_tokens": 1.5}, "max_tokens"),
    "stream as a string": ({**_message("hi"), "stream": "yes"}, "stream"),
    "messages as a string": ({"model": MODEL_NAME, "messages": "hi"}, "messages"),
    "content as a number": ({"model": MODEL_NAME, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    "unknown part type": (
        {"model": MODEL_NAME, "messages": [{"role": "user", "content": [{"type": "audio"}]}]},
        "messages[0].content[0]",
    ),
    "missing role": ({"model": MODEL_NAME, "messages": [{"content": "hi"}]}, "messages[0].role"),
    "model missing": ({"messages": [HI]}, "model"),
    "model a number": ({"model": 3, "messages": [HI]}, "model"),
    "n = 2": ({**_message("hi"), "n": 2}, "n"),
    "top_p zero": ({**_message("hi"), "top_p": 0}, "top_p"),
    "five stop sequences": ({**_message("hi"), "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    "seed over 64 bits": ({**_message("hi"), "seed": 2**64}, "seed"),
    "adapter_scale above 1": ({**_message("hi"), "adapter_scale": 1.5}, "adapter_scale"),
    "adapter_scale negative": ({**_message("hi"), "adapter_scale": -0.5}, "adapter_scale"),
    "presence_penalty": ({**_message("hi"), "presence_penalty": 0.5}, "presence_penalty"),
    "logit_bias": ({**_message("hi"), "logit_bias": {"376": -100}}, "logit_bias"),
    "image_url as a string": (
        _message([{"type": "image_url", "image_url": "http://x/a.png"}]),
        "messages[0].content[0].image_url",
    ),
    "function_call": ({**_message("hi"), "function_call": "auto"}, "function_call"),
    "tool_choice": ({**_message("hi"), "tool_choice": "required"}, "tool_choice"),
    "top_logprobs": ({**_message("hi"), "top_logprobs": 3}, "top_logprobs"),
    "audio output": ({**_message("hi"), "modalities": ["text", "audio"]}, "modalities"),
    "prediction": ({**_message("hi"), "prediction": {"type": "content", "content": "x"}}, "prediction"),
    "tools": ({**_message("hi"), "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    "stream_options a list": ({**_message("hi"), "stream": True, "stream_options": []}, "stream_options"),
}


def test_each_bad_request_gets_a_400_naming_the_parameter_and_the_server_keeps_serving(start_server):
    server = start_server()
    for name, (payload, param) in BAD_REQUESTS.items():
        status, body = post_chat(server, payload)
        assert status == 400, (name, status, body)
        _assert_openai_error(body, None)
        assert body["error"]["param"] == param, (name, body)
        assert body["error"]["type"] == "invalid_request_error"
    status, body = post_chat(server, {"model": "gpt-4", "messages": [HI]})
    assert status == 404 and body["error"]["param"] == "model" and body["error"]["code"] == "model_not_found"
    status, body = raw_request(server, "POST", "/v1/chat/completions", json.dumps(_message("hi")).encode())
    assert status == 400 and "Content-Type: application/json" in body["error"]["message"]  # no type: not parsed
    assert raw_request(server, "GET", "/health")[1]["status"] == "ok"
    assert post_chat(server, {**_message("hi"), "adapter_scale": 1.0})[0] == 200


def _trickle(server, head: bytes, pieces, wait: float) -> tuple[bytes, float]:
    """Send `head`, then each of `pieces` waiting up to `wait` s for an answer in between; return the whole
    answer once the server closes, and the seconds until its first bytes."""
    sock = socket.create_connection(server.server_address, timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    started = time.monotonic()
    sock.sendall(head)
    answer = b""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        for piece in pieces:
            sock.sendall(piece)
            sock.settimeout(wait)
            with contextlib.suppress(TimeoutError):
                answer += sock.recv(4096)
            if answer:
                break
        elapsed = time.monotonic() - started
        sock.settimeout(10)
        answer += b"".join(iter(lambda: sock.recv(4096), b""))
    sock.close()
    return answer, elapsed


def _bytes(data: bytes) -> list[bytes]:
    return [bytes([byte]) for byte in data]


def test_a_client_sending_its_headers_byte_by_byte_is_cut_off(start_server):
    """Slowloris: one byte per second (the issue's client held a connection for 75 s+ that way)."""
    server = start_server(header_timeout=1.5)
    request = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 200 + b"\r\n\r\n"
    answer, elapsed = _trickle(server, b"", _bytes(request), 1.0)
    assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer
    assert elapsed < 8  # cut at the deadline (slack for a loaded machine), long before the whole request's 4 min
    assert raw_request(server, "GET", "/health")[1]["status"] == "ok"


def test_a_client_sending_its_body_too_slowly_is_cut_off(start_server):
    server = start_server(body_timeout=1.0)
    body = json.dumps(_message("hi")).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    answer, elapsed = _trickle(server, head, _bytes(body), 0.2)
    assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer
    assert elapsed < 8  # the whole body at this pace takes about 20 s
    assert post_chat(server, _message("hi"))[0] == 200


def test_a_client_still_sending_its_body_reads_the_whole_refusal(start_server):
    """The server answers 413 while the client is mid-body: it must get the answer and a clean end, not a reset.

    A bare close with unread bytes makes the kernel send a reset, which fails the client's next send and can drop
    the answer before it is read; the lingering close reads and drops the rest, so the whole body goes out."""
    server = start_server(max_body_bytes=1000)
    total = 16 * 2**20  # more than loopback's socket buffers hold: a server that stops reading fails the sends
    sock = socket.create_connection(server.server_address, timeout=10)
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {total}\r\n\r\n"
    sock.sendall(head.encode())
    chunk = b"x" * 2**16
    for _ in range(total // len(chunk)):
        sock.sendall(chunk)  # a reset here (BrokenPipeError / ConnectionResetError) fails the test
    answer = b"".join(iter(lambda: sock.recv(4096), b""))
    sock.close()
    assert answer.startswith(b"HTTP/1.1 413") and answer.endswith(b'"code":"request_too_large"}}')
    assert raw_request(server, "GET", "/health")[1]["status"] == "ok"


def test_a_refused_client_that_keeps_sending_slowly_is_read_until_it_stops(start_server):
    """Lingering waits for the client's silence (2 s), not a fixed 2 s: pieces 0.4 s apart for 3.2 s all land."""
    server = start_server(max_body_bytes=1000)
    sock = socket.create_connection(server.server_address, timeout=10)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n")
    for _ in range(8):
        time.sleep(0.4)
        sock.sendall(b"x" * 2**16)  # after a close the server's kernel resets: a later send fails the test
    answer = b"".join(iter(lambda: sock.recv(4096), b""))
    sock.close()
    assert answer.startswith(b"HTTP/1.1 413") and answer.endswith(b'"code":"request_too_large"}}')


def test_an_announced_oversized_body_is_refused_before_it_is_sent(start_server):
    server = start_server(max_body_bytes=1000)
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 500000000\r\n\r\n"
    )
    answer, _ = _trickle(server, head, [b""], 5)  # headers only: the answer comes without a byte of the body
    assert answer.startswith(b"HTTP/1.1 413") and b"request_too_large" in answer


def test_a_chunked_body_over_the_limit_is_refused_while_it_arrives(start_server):
    server = start_server(max_body_bytes=1000)
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    chunks = [b"400\r\n" + b" " * 1024 + b"\r\n"] * 100  # up to 100 kB; the answer comes after the second
    answer, _ = _trickle(server, head, chunks, 0.05)
    assert answer.startswith(b"HTTP/1.1 413") and b"request_too_large" in answer


def test_connections_beyond_the_cap_are_refused_and_the_server_recovers(start_server):
    server = start_server(max_connections=40)
    threads = threading.active_count()
    idle = [socket.create_connection(server.server_address) for _ in range(40)]
    deadline = time.monotonic() + 5
    while server.active_connections < 40 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() <= threads  # open connections cost no threads (was one each)
    extra = socket.create_connection(server.server_address, timeout=10)
    answer = b"".join(iter(lambda: extra.recv(4096), b""))
    extra.close()
    assert answer.startswith(b"HTTP/1.1 503") and b"too_many_connections" in answer and b"Retry-After: 1" in answer
    for sock in idle:
        sock.close()
    deadline = time.monotonic() + 10
    while server.active_connections and time.monotonic() < deadline:
        time.sleep(0.01)
    assert raw_request(server, "GET", "/health")[1]["status"] == "ok"


def test_the_api_key_is_never_logged_not_even_from_the_query_string(start_server, caplog):
    key = "sk-query-0123456789-secret"
    caplog.set_level(logging.DEBUG)
    server = start_server(api_key=key)
    assert raw_request(server, "GET", f"/v1/models?api_key={key}&x=1")[0] == 401  # a query key is not accepted
    assert raw_request(server, "GET", "/v1/models", headers={"Authorization": f"Bearer {key}"})[0] == 200
    status, _ = raw_request(server, "GET", f"/health?token={key}")
    assert status == 200
    messages = [record.getMessage() for record in caplog.records]
    assert any('"GET /v1/models?api_key=[redacted]&x=[redacted]" 401' in message for message in messages), messages
    assert key not in caplog.text and all(key not in message for message in messages)


def test_metrics_count_requests_tokens_and_time_to_first_token(start_server):
    server = start_server()
    status, body = post_chat(server, {**_message("what shape is there"), "max_tokens": 5})
    assert status == 200
    assert post_chat(server, {"model": "gpt-4", "messages": [HI]})[0] == 404
    # Refused before the route runs: failed validation, a body that is not JSON, no JSON content type.
    assert post_chat(server, {**_message("hi"), "temperature": -1})[0] == 400
    assert post_chat(server, b'{"model": "m"')[0] == 400
    assert raw_request(server, "POST", "/v1/chat/completions", json.dumps(_message("hi")).encode(), {})[0] == 400
    status, text = raw_request(server, "GET", "/metrics")
    metrics = dict(line.rsplit(" ", 1) for line in text.decode().splitlines() if line and not line.startswith("#"))
    assert status == 200
    assert float(metrics["mmadapter_queue_depth"]) == 0 and float(metrics["mmadapter_running_requests"]) == 0
    assert float(metrics["mmadapter_generated_tokens_total"]) == body["usage"]["completion_tokens"]
    assert float(metrics["mmadapter_prompt_tokens_total"]) == body["usage"]["prompt_tokens"]
    assert float(metrics["mmadapter_time_to_first_token_seconds_count"]) == 1
    assert float(metrics['mmadapter_requests_total{status="200"}']) == 1
    assert float(metrics['mmadapter_requests_total{status="404"}']) == 1
    assert float(metrics['mmadapter_requests_total{status="400"}']) == 3


def test_prompt_tokens_are_limited_before_the_request_queues(served, start_server):
    server = start_server(max_prompt_tokens=200)  # the byte-level Alpaca prompt of "hi" has ~140
    status, body = post_chat(server, _message("red " * 40))  # ~300 tokens
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert body["error"]["param"] == "messages" and "--max-prompt-tokens" in body["error"]["message"]
    # A huge prompt is refused after tokenizing a little of it, not all of it.
    seen: list[int] = []
    encode = served.tokenizer.encode
    served.tokenizer.encode = lambda text, **options: seen.append(len(text)) or encode(text, **options)
    try:
        started = time.monotonic()
        status, body = post_chat(server, _message("red " * 1_000_000))  # 4 MB
        elapsed = time.monotonic() - started
    finally:
        del served.tokenizer.encode
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert sum(seen) < 20_000, sum(seen)
    assert elapsed < 10
    assert post_chat(server, _message("hi"))[0] == 200


def test_many_short_messages_are_refused_after_tokenizing_a_little(served, start_server):
    """Each turn's template headers count toward the bound: 2,000 one-letter exchanges (~30,000 prompt tokens) are
    refused without the full encoding, whose boundary search tokenizes the conversation once per reply."""
    server = start_server(max_prompt_tokens=200)
    exchanges = [
        {"role": role, "content": text} for _ in range(2000) for role, text in (("user", "a"), ("assistant", "b"))
    ]
    seen: list[int] = []
    encode = served.tokenizer.encode
    served.tokenizer.encode = lambda text, **options: seen.append(len(text)) or encode(text, **options)
    try:
        status, body = post_chat(
            server, {"model": MODEL_NAME, "messages": [*exchanges, {"role": "user", "content": "hi"}]}
        )
    finally:
        del served.tokenizer.encode
    assert status == 400 and body["error"]["code"] == "context_length_exceeded", body
    assert sum(seen) < 20_000, sum(seen)
    assert post_chat(server, _message("hi"))[0] == 200


@pytest.mark.parametrize(
    "text", ["red " * 3000, "a" * 9000, "ab\n" * 4000 + "日本語" * 1000, "x " * 2047 + "yz" * 2100]
)
def test_the_piecewise_count_is_a_lower_bound(tiny_tokenizer, text):
    exact = len(tiny_tokenizer.encode(text, add_special_tokens=False))
    assert tokens_at_least(tiny_tokenizer, [text], stop_above=10**9) <= exact
    assert tokens_at_least(tiny_tokenizer, [text], stop_above=10) > 10  # stops early once over


def test_32_clients_against_max_queue_8_all_complete_or_get_429(served, start_server):
    server = start_server(max_queue=8)
    results: list[tuple[int, str | None]] = []
    errors: list[BaseException] = []
    release = threading.Event()

    def busy_model(*args) -> None:  # held until the refusals are in: no race with how fast requests arrive
        release.wait(60)

    handle = served.model.register_forward_pre_hook(busy_model)

    def call() -> None:
        try:
            host, port = server.server_address
            import http.client

            connection = http.client.HTTPConnection(host, port, timeout=60)
            body = json.dumps({**_message("what shape is there"), "max_tokens": 6}).encode()
            connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            results.append((response.status, response.getheader("Retry-After")))
            connection.close()
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=call) for _ in range(32)]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while len(results) + len(errors) < 8 and time.monotonic() < deadline:  # a batch of 16 and 8 waiting fit
            time.sleep(0.01)
    finally:
        release.set()
        for thread in threads:
            thread.join(90)
        handle.remove()
    assert not any(thread.is_alive() for thread in threads), "a request hung"
    assert not errors, errors
    statuses = [status for status, _ in results]
    assert len(statuses) == 32 and set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= 9  # what is running plus eight waiting always fit
    assert statuses.count(429) >= 8  # the rest was refused at once, while the model was still busy
    assert all(retry == "1" for status, retry in results if status == 429)
    health = raw_request(server, "GET", "/health")[1]
    assert health["status"] == "ok" and health["pending"] == 0
    assert post_chat(server, _message("hi"))[0] == 200
