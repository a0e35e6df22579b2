"""The gradio image-chat demo, driven headlessly with gradio_client and once in a real browser."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import threading
from pathlib import Path

import pytest
import torch

from mmadapter.serve.chat import ChatTurn, stream_turn
from mmadapter.serve.web_demo import EXAMPLES_DIR, _example_rows, history_turns, launch_ui
from mmadapter.serve.worker import GenerationWorker
from mmadapter.vision.images import load_image

RED = EXAMPLES_DIR / "red_circle.png"
# gradio 6.31's queue calls pandas options that pandas 3 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword).*")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_ui(served, **options):
    port = free_port()
    ui = launch_ui(served, port=port, block=False, **options)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        ui.close()


def expected(served, message, history=(), image=None, **params):
    events = stream_turn(served, ChatTurn(message, history, image, served.defaults.replace(**params)))
    return "".join(event.text for event in list(events)[1:])


def test_history_and_examples_parsing():
    history = [
        {"role": "user", "content": [{"path": "/tmp/a.png"}, "what shape"]},
        {"role": "assistant", "content": "a circle"},
        {"role": "user", "content": ("/tmp/b.png",)},
        {"role": "user", "content": [{"type": "text", "text": "and now"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a square"}]},
    ]
    assert history_turns(history) == ([("what shape", "a circle"), ("and now", "a square")], "/tmp/b.png")
    rows = _example_rows(EXAMPLES_DIR, [0.1, 0.75, 64], multimodal=True)
    assert len(rows) == 3 and all(Path(row[0]["files"][0]).is_file() and row[1:] == [0.1, 0.75, 64] for row in rows)


def test_gradio_client_streams_multi_turn_image_chat(served_v2):
    from gradio_client import Client, handle_file

    greedy = {"temperature": 0.0, "top_p": 0.75, "max_new_tokens": 8}
    image = load_image(RED)
    first = expected(served_v2, "what shape is it", (), image, **greedy)
    with running_ui(served_v2) as url:
        client = Client(url, verbose=False)
        job = client.submit(
            message={"text": "what shape is it", "files": [handle_file(str(RED))]}, api_name="/chat", **greedy
        )
        chunks = list(job)
        assert chunks[-1] == job.result() == first
        assert all(later.startswith(earlier) for earlier, later in zip(chunks, chunks[1:], strict=False))
        # The session keeps the history and the image for the next turn.
        second = client.predict(message={"text": "what colour", "files": []}, api_name="/chat", **greedy)
    assert second == expected(served_v2, "what colour", [("what shape is it", first)], image, **greedy)


@contextlib.contextmanager
def scripted_answer(model, tokenizer, answer: str):
    """Make the model answer `answer` (greedy) whatever it is asked: the browser test checks plumbing, not math."""
    script = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
    step = [0]

    def force(module, args, kwargs, output):
        if kwargs["input_ids"].shape[1] > 1:  # a new prompt (prefill)
            step[0] = 0
        logits = torch.full_like(output.logits[:, -1], -1e4)
        logits[:, script[min(step[0], len(script) - 1)]] = 1e4
        output.logits[:, -1] = logits
        step[0] += 1
        return output

    handle = model.register_forward_hook(force, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _chrome():
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,900",
    ):
        options.add_argument(argument)
    options.binary_location = shutil.which("chromium")
    return webdriver.Chrome(
        options=options, service=webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    )


@pytest.mark.slow
@pytest.mark.skipif(
    not (shutil.which("chromium") and shutil.which("chromedriver")),
    reason="Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)",
)
def test_image_chat_in_a_real_browser(served_v2, tmp_path, capsys):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    answer = "A red circle."
    served_v2.defaults = served_v2.defaults.replace(max_new_tokens=64)  # the slider's starting value
    with scripted_answer(served_v2.model, served_v2.tokenizer, answer), running_ui(served_v2) as url:
        driver = _chrome()
        try:
            driver.get(url)
            # Gradio re-renders the chat while it streams: an element found a moment ago may be gone.
            wait = WebDriverWait(driver, 60, ignored_exceptions=(StaleElementReferenceException,))
            upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "input[type=file]"))
            upload.send_keys(str(RED))
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "img.thumbnail-image"))  # the upload finished
            box = driver.find_element(By.CSS_SELECTOR, "textarea")
            box.send_keys("What shape is in the image?")
            box.send_keys(Keys.ENTER)
            bot = wait.until(lambda d: [m for m in d.find_elements(By.CSS_SELECTOR, '[data-testid="bot"]') if m.text])
            wait.until(lambda d: d.find_element(By.CSS_SELECTOR, '[data-testid="bot"]').text == answer)
            users = driver.find_elements(By.CSS_SELECTOR, '[data-testid="user"]')
            assert any("What shape is in the image?" in u.text for u in users)
            assert any("image" in (u.get_attribute("aria-label") or "") for u in users)
            screenshot = tmp_path / "web_demo.png"
            driver.save_screenshot(str(screenshot))
            artifacts = Path(
                os.environ.get("MMADAPTER_TEST_ARTIFACTS", Path(tempfile.gettempdir()) / "mmadapter-artifacts")
            )
            artifacts.mkdir(parents=True, exist_ok=True)
            shutil.copy(screenshot, artifacts / "web_demo.png")
            with capsys.disabled():  # shown even when pytest captures output
                print(f"\nweb demo screenshot: {artifacts / 'web_demo.png'}")
            assert bot and screenshot.stat().st_size > 10_000
            driver.find_element(By.CSS_SELECTOR, 'button[aria-label="Clear"]').click()
            wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, '[data-testid="bot"]'))
        finally:
            driver.quit()


def test_text_only_adapter_gets_a_text_chat(served):
    """A text adapter (V1) gets a plain textbox; the chat function streams the templated answer."""
    import gradio as gr

    from mmadapter.serve.web_demo import build_ui

    ui = build_ui(served)
    assert not ui.multimodal and isinstance(ui.textbox, gr.Textbox)
    history = [{"role": "user", "content": "what shape"}, {"role": "assistant", "content": "a circle"}]
    replies = list(ui.fn("what colour", history, 0.0, 0.75, 8))
    ui.close()
    assert replies[-1] == expected(
        served, "what colour", [("what shape", "a circle")], temperature=0.0, max_new_tokens=8
    )
    assert all(later.startswith(earlier) for earlier, later in zip(replies, replies[1:], strict=False))


def _generation_threads() -> set[threading.Thread]:
    return {thread for thread in threading.enumerate() if thread.name == "mmadapter-generation"}


def test_closing_the_ui_stops_the_worker_it_made_and_only_that_one(served):
    from mmadapter.serve.web_demo import build_ui

    before = _generation_threads()
    own = build_ui(served)
    (made,) = _generation_threads() - before
    shared_worker = GenerationWorker(served)
    shared = build_ui(served, shared_worker)
    assert len(_generation_threads() - before) == 2  # the shared worker; the second UI made none

    own.close()  # never launched: gradio's close does nothing, the worker still stops
    assert not made.is_alive()
    shared.close()
    assert shared_worker.alive  # it belongs to the caller (e.g. the HTTP API of `serve --ui`)
    assert list(shared.fn("hi", [], 0.0, 0.75, 2))  # and still answers
    shared_worker.close()
