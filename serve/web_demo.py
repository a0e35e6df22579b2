"""The web image-chat demo: gradio's multimodal `ChatInterface` over the served model.

Upload an image, talk about it over several turns, watch answers stream, tune temperature /
top-p / answer length, clear the chat (the chatbot's trash button), start from the examples in
assets/examples. Generation goes through a `GenerationWorker`, so the UI and the HTTP API of
`mmadapter serve --ui` share one model and one queue; stopping an answer in the browser cancels
its generation.

gradio is an optional extra (`pip install mmadapter[demo]`); gradio 6 takes messages-format
history only (specs/ecosystem-notes.md §4.2).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mmadapter.serve.chat import ChatTurn
from mmadapter.serve.generate import TextDelta
from mmadapter.serve.loader import ServedModel
from mmadapter.serve.worker import Failed, GenerationWorker, QueueFullError, WorkerClosedError
from mmadapter.vision.images import DEFAULT_MAX_PIXELS, load_image

#: Example images (+ the questions in examples.txt beside them) shipped in the repository.
EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "assets" / "examples"
#: The gradio endpoint name; `gradio_client.Client(url).predict(..., api_name="/chat")`.
API_NAME = "chat"


def _import_gradio():
    try:
        import gradio
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError("the web UI needs gradio: pip install 'mmadapter[demo]'") from error
    return gradio


def _parts(content: Any) -> Iterator[tuple[str, str]]:
    """(kind, value) pairs of a gradio message's content: ("text", str) or ("file", path)."""
    if content is None:
        return
    if isinstance(content, str):
        yield "text", content
    elif isinstance(content, list | tuple):
        if isinstance(content, tuple) and content and all(isinstance(c, str) for c in content):
            yield from (("file", path) for path in content)  # gradio's (path,) file message
            return
        for item in content:
            yield from _parts(item)
    elif isinstance(content, dict):
        if content.get("type") == "text":
            yield "text", str(content.get("text", ""))
        elif "path" in content:
            yield "file", content["path"]
        elif isinstance(content.get("file"), dict) and "path" in content["file"]:
            yield "file", content["file"]["path"]
    elif hasattr(content, "path"):  # a FileData-like object
        yield "file", str(content.path)


def history_turns(history: Sequence[dict[str, Any]]) -> tuple[list[tuple[str, str]], str | None]:
    """gradio messages -> finished (user, assistant) exchanges and the latest image path in them."""
    turns: list[tuple[str, str]] = []
    user: list[str] = []
    image = None
    for message in history:
        texts = []
        for kind, value in _parts(message.get("content")):
            if kind == "file":
                image = value if message.get("role") == "user" else image
            elif value:
                texts.append(value)
        if message.get("role") == "user":
            user += texts
        elif message.get("role") == "assistant":
            turns.append(("\n".join(user), "\n".join(texts)))
            user = []
    return turns, image


def _example_rows(examples_dir: Path, defaults: list[Any], multimodal: bool) -> list[list[Any]] | None:
    questions = examples_dir / "examples.txt"
    if not questions.is_file():
        return None
    rows = []
    for line in questions.read_text().splitlines():
        name, _, question = line.partition("\t")
        if not question or not (examples_dir / name).is_file():
            continue
        message = {"text": question, "files": [str(examples_dir / name)]} if multimodal else question
        rows.append([message, *defaults])
    return rows or None


def build_ui(
    served: ServedModel,
    worker: GenerationWorker | None = None,
    *,
    title: str | None = None,
    description: str | None = None,
    examples_dir: str | Path | None = EXAMPLES_DIR,
    max_pixels: int = DEFAULT_MAX_PIXELS,
):
    """A `gr.Blocks` (a ChatInterface) chatting with `served` through `worker`.

    Without `worker` the UI makes its own, and its `close()` also stops that worker; a worker passed
    in (e.g. shared with the HTTP API) stays open and belongs to the caller.
    """
    gr = _import_gradio()
    own_worker = worker is None
    worker = worker or GenerationWorker(served)
    multimodal = served.takes_images
    defaults = served.defaults
    max_tokens_limit = max(64, min(2048, served.engine.context_length))

    def respond(message, history, temperature, top_p, max_new_tokens, adapter_scale=1.0):
        text, files = (message.get("text", ""), message.get("files", [])) if multimodal else (message, [])
        turns, image_path = history_turns(history)
        if files:
            image_path = files[-1]
        image = None
        if image_path is not None:
            if not multimodal:
                raise gr.Error(f"this model ({served.method or 'no adapter'}) does not take images")
            try:
                image = load_image(image_path, max_pixels=max_pixels)
            except ValueError as error:
                raise gr.Error(f"cannot use this image: {error}") from error
        if not text.strip() and image is None:
            raise gr.Error("type a message")
        params = defaults.replace(
            temperature=float(temperature), top_p=float(top_p), max_new_tokens=int(max_new_tokens)
        )
        try:
            job = worker.submit(ChatTurn(text, turns, image, params, adapter_scale=float(adapter_scale)))
        except (QueueFullError, WorkerClosedError) as error:
            raise gr.Error(str(error)) from error
        reply = ""
        with contextlib.closing(job.events()) as events:  # closing (Stop button) cancels the generation
            for event in events:
                if isinstance(event, Failed):
                    raise gr.Error(str(event.error))
                if isinstance(event, TextDelta) and event.text:
                    reply += event.text
                    yield reply
        if not reply:
            yield ""

    sliders = [
        gr.Slider(0.0, 2.0, value=defaults.temperature, step=0.05, label="Temperature"),
        gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top-p"),
        gr.Slider(
            1, max_tokens_limit, value=min(defaults.max_new_tokens, max_tokens_limit), step=1, label="Max tokens"
        ),
    ]
    slider_defaults = [defaults.temperature, defaults.top_p, min(defaults.max_new_tokens, max_tokens_limit)]
    if served.variant(None).route is not None:  # a routed adapter can be dialled down per request (0 = the base)
        sliders.append(gr.Slider(0.0, 1.0, value=1.0, step=0.05, label="Adapter strength"))
        slider_defaults.append(1.0)
    examples = _example_rows(Path(examples_dir), slider_defaults, multimodal) if examples_dir else None
    textbox = (
        gr.MultimodalTextbox(file_types=["image"], file_count="single", placeholder="Ask about an image…")
        if multimodal
        else gr.Textbox(placeholder="Type a message…")
    )
    kind = "image chat" if multimodal else "chat"
    ui = gr.ChatInterface(
        respond,
        multimodal=multimodal,
        textbox=textbox,
        additional_inputs=sliders,
        additional_inputs_accordion=gr.Accordion("Parameters", open=False),
        examples=examples,
        cache_examples=False,
        title=title or f"mmadapter {kind}: {served.name}",
        description=description
        or f"{served.method or 'base model'} · template {served.template.name} · answers stream as they are generated",
        api_name=API_NAME,
        fill_height=True,
    )
    if own_worker:
        _close_worker_with(ui, worker)
    return ui


def _close_worker_with(ui: Any, worker: GenerationWorker) -> None:
    """Make `ui.close()` also stop `worker`. gradio's `Blocks.close` has no shutdown hook, and a worker left
    running when Python exits can abort the process mid-generation (see `mmadapter.serve.worker`)."""
    close_ui = ui.close

    @functools.wraps(close_ui)
    def close(*args: Any, **kwargs: Any) -> None:
        try:
            close_ui(*args, **kwargs)
        finally:
            worker.close()

    ui.close = close


def launch_ui(
    served: ServedModel,
    *,
    host: str = "127.0.0.1",
    port: int | None = 7860,
    worker: GenerationWorker | None = None,
    block: bool = True,
    share: bool = False,
    **build_options: Any,
):
    """Build the UI and serve it on http://HOST:PORT (127.0.0.1 by default). Returns the gradio app;
    with `block=False` it runs in the background (stop it with `.close()`). With `block=True` it
    returns after Ctrl-C, already closed."""
    ui = build_ui(served, worker, **build_options)
    ui.queue()
    try:
        ui.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block, show_error=True)
    except BaseException:  # e.g. the port is taken: free the worker build_ui may have made
        ui.close()
        raise
    if block:  # gradio's blocking launch only stops its HTTP server on Ctrl-C: stop the queue and our worker too
        ui.close()
    return ui
