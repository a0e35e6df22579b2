"""`mmadapter chat` (terminal) and `mmadapter serve` (process) from the command line."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from mmadapter.adapters import save_adapter
from mmadapter.cli.main import main
from mmadapter.serve.chat import ChatTurn, stream_turn
from mmadapter.serve.terminal_chat import TerminalChat
from mmadapter.serve.web_demo import EXAMPLES_DIR
from mmadapter.vision.images import load_image

RED = EXAMPLES_DIR / "red_circle.png"


def answer(served, message, history=(), image=None) -> str:
    return "".join(event.text for event in list(stream_turn(served, ChatTurn(message, history, image)))[1:])


def test_chat_keeps_history_survives_bad_images_and_resets(served_v2, tmp_path):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    missing = tmp_path / "missing.png"
    lines = ["what shape", f"/image {missing}", f"/image {not_an_image}", "what colour", f"/image {RED}"]
    script = "\n".join([*lines, "describe it", "/reset", "/bogus", "hi", "/exit", "never read"])
    output = io.StringIO()
    chat = TerminalChat(served_v2, input=io.StringIO(script + "\n"), output=output)
    assert chat.run() == 0
    text = output.getvalue()
    first = answer(served_v2, "what shape")
    second = answer(served_v2, "what colour", [("what shape", first)])
    third = answer(served_v2, "describe it", (), load_image(RED))  # a new image starts a new conversation
    assert f"assistant> {first}\n" in text and f"assistant> {second}\n" in text and f"assistant> {third}\n" in text
    assert f"error: {tmp_path / 'missing.png'}: file not found" in text
    assert f"error: {not_an_image}: not a supported image" in text
    assert "image attached" in text and "conversation reset" in text and "unknown command /bogus" in text
    assert "you> what shape\nassistant> " in text  # piped input is echoed: the transcript reads as a chat
    assert chat.history == [("hi", answer(served_v2, "hi"))] and chat.image is None


def test_images_are_refused_for_a_text_adapter(served):
    output = io.StringIO()
    chat = TerminalChat(served, input=io.StringIO(f"/image {RED}\n"), output=output)
    chat.run()
    assert "does not take images" in output.getvalue() and chat.image is None


def _folders(tiny_llama, tiny_tokenizer, v1_model, tmp_path):
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)  # the same seeded base weights the adapter was attached to
    tiny_tokenizer.save_pretrained(base)
    return base, save_adapter(v1_model, tmp_path / "v1", prompt_template="alpaca")


def test_chat_command_end_to_end(tiny_llama, tiny_tokenizer, v1_model, tmp_path, monkeypatch, capsys):
    base, adapter = _folders(tiny_llama, tiny_tokenizer, v1_model, tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO("what shape\n"))
    assert (
        main(["chat", "--base", str(base), "--adapter", str(adapter), "--temperature", "0", "--max-new-tokens", "4"])
        == 0
    )
    captured = capsys.readouterr()
    assert "chatting with v1 (llama-adapter-v1; template alpaca; images: no)" in captured.out
    assert "assistant> " in captured.out and "records no prompt template" not in captured.err
    assert main(["chat", "--base", str(base), "--image", str(RED)]) == 2

    # Saved without its template (`save_adapter(model, dir)`): asked with the official one, and told so.
    unrecorded = save_adapter(v1_model, tmp_path / "unrecorded")
    monkeypatch.setattr(sys, "stdin", io.StringIO("what shape\n"))
    assert main(["chat", "--base", str(base), "--adapter", str(unrecorded), "--max-new-tokens", "2"]) == 0
    assert f"note: {unrecorded} records no prompt template; asking it with 'alpaca'" in capsys.readouterr().err


def _get(url: str, key: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


@pytest.mark.slow
def test_serve_command_runs_a_server_that_checks_the_key_and_never_logs_it(
    tiny_llama, tiny_tokenizer, v1_model, tmp_path
):
    base, adapter = _folders(tiny_llama, tiny_tokenizer, v1_model, tmp_path)
    key = "sk-process-test-key-42"
    env = {**os.environ, "MMADAPTER_API_KEY": key, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "mmadapter.cli.main", "serve", "--base", str(base), "--adapter", str(adapter)]
    process = subprocess.Popen(
        [*command, "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        banner = process.stdout.readline()
        assert banner.startswith("OpenAI-compatible API: http://127.0.0.1:"), banner + process.stderr.read()
        url = banner.split()[2].removesuffix("/v1")
        assert _get(f"{url}/health") == 200
        assert _get(f"{url}/v1/models") == 401
        assert _get(f"{url}/v1/models", key) == 200
        body = b'{"model": "v1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}'
        request = urllib.request.Request(
            f"{url}/v1/chat/completions",
            data=body,
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200
    finally:
        process.send_signal(signal.SIGTERM)  # stops cleanly, like Ctrl-C
        out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert '"POST /v1/chat/completions" 200' in err  # the access log is on
    assert key not in out and key not in err
