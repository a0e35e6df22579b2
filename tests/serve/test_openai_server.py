"""The OpenAI-compatible server, driven by the official `openai` client and by raw HTTP."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
import time

import openai
import pytest
import torch
from PIL import Image

from mmadapter.serve.chat import ChatTurn, stream_turn, visual_inputs
from tests.helpers.served_model import MODEL_NAME


def client_for(server, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=api_key, max_retries=0, timeout=30)


def raw_request(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=30)
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    data = response.read()
    connection.close()
    is_json = response.getheader("Content-Type", "").startswith("application/json")
    return response.status, (json.loads(data) if data and is_json else data)


def post_chat(server, payload, headers=None):
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return raw_request(
        server, "POST", "/v1/chat/completions", body, {"Content-Type": "application/json", **(headers or {})}
    )


def expected_answer(served, message: str, history=()) -> tuple[str, int, int]:
    events = list(stream_turn(served, ChatTurn(message, history)))
    text = "".join(event.text for event in events[1:])
    return text, events[0].prompt_tokens, events[-1].completion_tokens


def test_openai_client_text_completion(served, start_server):
    server = start_server()
    response = client_for(server).chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "what shape is there"}]
    )
    text, prompt_tokens, completion_tokens = expected_answer(served, "what shape is there")
    assert response.choices[0].message.content == text
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].finish_reason in ("stop", "length")
    assert response.object == "chat.completion" and response.model == MODEL_NAME and response.id.startswith("chatcmpl-")
    assert response.usage.prompt_tokens == prompt_tokens
    assert response.usage.completion_tokens == completion_tokens
    assert response.usage.total_tokens == prompt_tokens + completion_tokens


def test_openai_client_streaming_with_history_and_usage(served, start_server):
    server = start_server()
    messages = [
        {"role": "user", "content": "what shape is there"},
        {"role": "assistant", "content": "a circle"},
        {"role": "user", "content": [{"type": "text", "text": "what colour"}]},
    ]
    chunks = list(
        client_for(server).chat.completions.create(
            model=MODEL_NAME, messages=messages, stream=True, stream_options={"include_usage": True}
        )
    )
    text, prompt_tokens, completion_tokens = expected_answer(
        served, "what colour", [("what shape is there", "a circle")]
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == text
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == completion_tokens
    assert chunks[-1].usage.prompt_tokens == prompt_tokens


def test_stream_ends_with_done(start_server):
    server = start_server()
    status, body = post_chat(
        server, {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    )
    assert status == 200
    events = [line for line in body.decode().split("\n\n") if line]
    assert all(event.startswith("data: ") for event in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_models_and_health(start_server):
    server = start_server()
    models = client_for(server).models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert raw_request(server, "GET", "/health")[1]["status"] == "ok"
    assert raw_request(server, "GET", f"/v1/models/{MODEL_NAME}")[1]["id"] == MODEL_NAME


def _message(content):
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": content}]}


def _image_part(url):
    return [{"type": "text", "text": "what is it"}, {"type": "image_url", "image_url": {"url": url}}]


def png_data_url(size: tuple[int, int] = (40, 30), colour: str = "red") -> str:
    import base64
    import io

    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _assert_openai_error(body, code):
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]
    if code:
        assert body["error"]["code"] == code


BAD_REQUESTS = {
    "invalid JSON": (b"{not json", 400, "invalid_json"),
    "not an object": (b"[1, 2]", 400, None),
    "unknown model": ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "model_not_found"),
    "no messages": ({"model": MODEL_NAME, "messages": []}, 400, None),
    "last message from assistant": (
        {"model": MODEL_NAME, "messages": [{"role": "assistant", "content": "hi"}]},
        400,
        None,
    ),
    "bad role": ({"model": MODEL_NAME, "messages": [{"role": "tool", "content": "x"}]}, 400, None),
    "bad temperature": ({**_message("hi"), "temperature": 5}, 400, None),
    "bad max_tokens": ({**_message("hi"), "max_tokens": 0}, 400, None),
    "n > 1": ({**_message("hi"), "n": 2}, 400, None),
    "prompt longer than the context": (_message("red " * 1200), 400, "context_length_exceeded"),
    "image to a text-only adapter": (_message(_image_part(png_data_url())), 400, "image_not_supported"),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(start_server, name):
    server = start_server()
    payload, status, code = BAD_REQUESTS[name]
    got_status, body = post_chat(server, payload)
    assert got_status == status
    _assert_openai_error(body, code)
    assert post_chat(server, _message("hi"))[0] == 200


BAD_IMAGES = {
    "bad base64": ("data:image/png;base64,@@@not-base64@@@", "invalid_image"),
    "non-image data": ("data:image/png;base64,aGVsbG8gd29ybGQ=", "invalid_image"),
    "text data URL": ("data:text/plain;base64,aGVsbG8=", "invalid_image"),
    "remote URL refused": ("http://127.0.0.1:9/cat.png", "remote_images_disabled"),
    "too many pixels": (png_data_url((200, 200)), "invalid_image"),
}


def test_image_requests_on_a_multimodal_adapter(served_v2, start_server):
    """Image data URLs work through the official client; every bad image is a 400 naming the part."""
    server = start_server(served_v2, max_image_pixels=100 * 100)
    from PIL import Image

    from mmadapter.vision.images import decode_base64_image, load_image_bytes

    url = png_data_url()
    messages = [{"role": "user", "content": _image_part(url)}]
    client = client_for(server)
    response = client.chat.completions.create(model="tiny-v2", messages=messages)
    streamed = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(model="tiny-v2", messages=messages, stream=True)
    )
    image = load_image_bytes(decode_base64_image(url))
    events = list(stream_turn(served_v2, ChatTurn("what is it", (), image)))
    expected = "".join(event.text for event in events[1:])
    assert response.choices[0].message.content == streamed == expected
    # The picture reaches the model: another colour gives other next-token logits for the same prompt.
    ids = torch.tensor([events[0].prompt_tokens * [1]])
    red = served_v2.model(ids, **visual_inputs(served_v2, image)).logits
    blue = served_v2.model(ids, **visual_inputs(served_v2, Image.new("RGB", (40, 30), "blue"))).logits
    assert not torch.allclose(red, blue)
    for name, (bad_url, code) in BAD_IMAGES.items():
        status, body = post_chat(
            server, {"model": "tiny-v2", "messages": [{"role": "user", "content": _image_part(bad_url)}]}
        )
        assert status == 400, name
        _assert_openai_error(body, code)
        assert body["error"]["param"] == "messages[0].content[1].image_url", name
    assert client.chat.completions.create(model="tiny-v2", messages=messages).choices[0].message.content == expected


def test_body_size_limit_wrong_method_and_unknown_route(start_server):
    server = start_server(max_body_bytes=1000)
    status, body = post_chat(server, _message("x" * 2000))
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert raw_request(server, "GET", "/v1/chat/completions")[0] == 405
    assert raw_request(server, "GET", "/v2/anything")[0] == 404
    assert post_chat(server, _message("hi"))[0] == 200


def test_api_key_is_enforced_and_never_logged(start_server, caplog):
    key = "sk-test-0123456789-secret"
    caplog.set_level(logging.DEBUG)
    server = start_server(api_key=key)
    with pytest.raises(openai.AuthenticationError):
        client_for(server, api_key="wrong").chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}]
        )
    assert raw_request(server, "GET", "/v1/models")[0] == 401
    assert raw_request(server, "GET", "/health")[0] == 200
    response = client_for(server, api_key=key).chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}]
    )
    assert response.choices[0].message.content is not None
    assert caplog.records, "the access log should have recorded the requests"
    assert all(key not in record.getMessage() for record in caplog.records)
    assert key not in caplog.text


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_mid_answer_frees_the_model(served, start_server, stream):
    server = start_server(max_queue=0, max_batch=1)  # one request at a time: a second one is refused
    forwards = []

    def slow_forward(*args):  # ~20 ms per token: a whole answer would take seconds
        forwards.append(1)
        time.sleep(0.02)

    handle = served.model.register_forward_pre_hook(slow_forward)
    try:
        body = json.dumps({**_message("the"), "stream": stream, "max_tokens": 600}).encode()
        sock = socket.create_connection(server.server_address[:2])
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        sock.sendall(head.encode() + body)
        if stream:
            assert sock.recv(64).startswith(b"HTTP/1.1 200")
        else:  # nothing is sent before the answer is complete; wait until it is generating
            started = time.monotonic()
            while not forwards and time.monotonic() - started < 10:
                time.sleep(0.01)
        assert server.worker.pending == 1
        assert post_chat(server, _message("hi"))[0] == 429  # the slot is taken while it streams
        sock.close()
        at_close = len(forwards)
        deadline = time.monotonic() + 10
        while server.worker.pending and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.worker.pending == 0
        assert len(forwards) - at_close < 150  # stopped soon (a few tokens; slack for a loaded machine), not after 600
    finally:
        handle.remove()
    assert post_chat(server, _message("hi"))[0] == 200


def test_remote_image_urls_work_only_when_the_operator_allows_them(served_v2, start_server):
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from mmadapter.serve.web_demo import EXAMPLES_DIR
    from mmadapter.vision.images import load_image

    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(EXAMPLES_DIR))
    files = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{files.server_address[1]}/red_circle.png"
        payload = {"model": "tiny-v2", "messages": [{"role": "user", "content": _image_part(url)}]}
        assert post_chat(start_server(served_v2), payload)[0] == 400
        status, body = post_chat(start_server(served_v2, allow_remote_images=True), payload)
        assert status == 200
        events = list(stream_turn(served_v2, ChatTurn("what is it", (), load_image(EXAMPLES_DIR / "red_circle.png"))))
        assert body["choices"][0]["message"]["content"] == "".join(event.text for event in events[1:])
        missing = {**payload, "messages": [{"role": "user", "content": _image_part(url + ".missing")}]}
        status, body = post_chat(start_server(served_v2, allow_remote_images=True), missing)
        assert status == 400 and body["error"]["code"] == "invalid_image_url"
    finally:
        files.shutdown()
        files.server_close()


def test_an_image_url_that_is_not_a_url_is_refused_without_echoing_it(served_v2, start_server):
    """Bare base64 (no data: prefix) was echoed back, lowercased, as an 'unsupported scheme': 580 kB of error."""
    import base64

    from mmadapter.serve.web_demo import EXAMPLES_DIR

    bare = base64.b64encode((EXAMPLES_DIR / "red_circle.png").read_bytes()).decode()
    server = start_server(served_v2)
    for url, expected in ((bare, "not a URL; send the image as a base64 data URL"), ("ftp://x/a.png", "'ftp'")):
        payload = {"model": "tiny-v2", "messages": [{"role": "user", "content": _image_part(url)}]}
        status, body = post_chat(server, payload)
        assert status == 400 and expected in body["error"]["message"], body
        assert body["error"]["code"] == "invalid_image_url" and len(json.dumps(body)) < 400


def test_an_image_sent_again_reuses_its_visual_prompt(served_v2):
    """Clients resend the conversation's picture with every turn: CLIP runs once per picture, same prompt."""
    from mmadapter.adapters.methods.llama_adapter_v2 import ENCODER_ATTRIBUTE, visual_prompter_of
    from mmadapter.adapters.methods.prompt_attention import VISUAL_PROMPT_KWARG

    encoder_calls = []
    hook = getattr(served_v2.model, ENCODER_ATTRIBUTE).register_forward_hook(lambda *_: encoder_calls.append(1))
    red = Image.new("RGB", (40, 30), "red")
    first = visual_inputs(served_v2, red)[VISUAL_PROMPT_KWARG]
    again = visual_inputs(served_v2, red.copy())[VISUAL_PROMPT_KWARG]  # the same pixels in a new object
    blue = visual_inputs(served_v2, Image.new("RGB", (40, 30), "blue"))[VISUAL_PROMPT_KWARG]
    hook.remove()
    assert len(encoder_calls) == 2
    assert torch.equal(again, first) and not torch.equal(blue, first)
    visual_prompter_of(served_v2.model).forget()
    assert torch.equal(visual_inputs(served_v2, red)[VISUAL_PROMPT_KWARG], first)  # what a fresh computation gives
