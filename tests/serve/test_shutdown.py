"""Stopping the server while it works: in-flight answers end with a 503, every thread is joined,
and `mmadapter serve` exits 0 on SIGTERM even mid-generation.

The process test is the regression test for the exit code -6 ("terminate called without an active
exception"): the generation thread used to outlive `close()` and was still inside torch when
Python finalised, which makes libtorch abort the process.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from mmadapter.serve.worker import GenerationWorker
from tests.helpers.served_model import MODEL_NAME

JSON = {"Content-Type": "application/json"}


def _chat(content: str, **options) -> bytes:
    return json.dumps({"model": MODEL_NAME, "messages": [{"role": "user", "content": content}], **options}).encode()


def _server_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name in ("mmadapter-http", "mmadapter-generation")]


def test_close_stops_the_running_answer_fails_waiting_ones_and_joins_every_thread(served, start_server):
    server = start_server(max_queue=1)
    forwards = []

    def slow_forward(*args):  # ~20 ms per token: the 200-token answer would take seconds
        forwards.append(1)
        time.sleep(0.02)

    handle = served.model.register_forward_pre_hook(slow_forward)
    waiting: list[tuple[int, dict]] = []
    try:
        host, port = server.server_address[:2]
        streaming = http.client.HTTPConnection(host, port, timeout=30)
        streaming.request("POST", "/v1/chat/completions", body=_chat("the", stream=True, max_tokens=200), headers=JSON)
        answer = streaming.getresponse()
        assert answer.status == 200 and answer.readline().startswith(b"data: ")  # it is generating

        def wait_in_queue():
            connection = http.client.HTTPConnection(host, port, timeout=30)
            connection.request("POST", "/v1/chat/completions", body=_chat("hi"), headers=JSON)
            response = connection.getresponse()
            waiting.append((response.status, json.loads(response.read())))

        queued = threading.Thread(target=wait_in_queue)
        queued.start()
        deadline = time.monotonic() + 10
        while server.worker.pending < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.worker.pending == 2
        idle = socket.create_connection((host, port))  # a client that connects and never sends a request
        while server.active_connections < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.active_connections == 3

        at_close = len(forwards)
        server.close()
        stopped_after = len(forwards) - at_close
        rest = answer.read()
        queued.join(10)
    finally:
        handle.remove()
    assert stopped_after < 100  # stopped at its next piece of text (slack for a loaded machine), not after 200
    assert b'"code": "shutting_down"' in rest and b"[DONE]" not in rest
    assert [status for status, _ in waiting] == [503] and waiting[0][1]["error"]["code"] == "shutting_down"
    assert idle.recv(1) == b""  # its connection was shut down rather than left hanging
    idle.close()
    assert not server.worker.alive and server.worker.pending == 0
    assert server.active_connections == 0 and not _server_threads()


def test_close_of_an_idle_worker_is_quick_and_repeatable(served):
    worker = GenerationWorker(served)
    assert worker.alive
    assert worker.close() and not worker.alive
    assert worker.close()  # a second close is harmless


def _long_answer_base(tiny_llama, tiny_tokenizer, folder):
    """The tiny LLaMA with a long context and an end-of-sequence token greedy decoding never picks,
    so an answer is still being generated whenever the signal comes."""
    model = tiny_llama()
    model.config.max_position_embeddings = 8192
    with torch.no_grad():
        model.lm_head.weight[tiny_tokenizer.eos_token_id] = 0.0  # logit 0 while the best token's is positive
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_sigterm_mid_generation_exits_0_and_tells_the_client(tiny_llama, tiny_tokenizer, tmp_path):
    base = _long_answer_base(tiny_llama, tiny_tokenizer, tmp_path / "base")
    command = [sys.executable, "-m", "mmadapter.cli.main", "serve", "--base", str(base), "--port", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [*command, "--temperature", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        banner = process.stdout.readline()
        assert banner.startswith("OpenAI-compatible API: http://127.0.0.1:"), banner + process.stderr.read()
        host, port = banner.split()[2].removeprefix("http://").removesuffix("/v1").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=60)
        message = {"role": "user", "content": "hi"}
        body = json.dumps({"model": "base", "messages": [message], "stream": True, "max_tokens": 8000})
        connection.request("POST", "/v1/chat/completions", body=body.encode(), headers=JSON)
        answer = connection.getresponse()
        chunks = [answer.readline() for _ in range(8)]  # role chunk + a few tokens: generation is under way
        assert answer.status == 200 and sum(b'"content"' in chunk for chunk in chunks) >= 3, chunks
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    try:
        rest = answer.read()
    except http.client.IncompleteRead as cut:  # the event arrived, the closing empty chunk did not
        rest = cut.partial
    assert process.returncode == 0, err
    assert "terminate called" not in err
    assert b'"code": "shutting_down"' in rest and b"[DONE]" not in rest
