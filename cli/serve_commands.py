"""`mmadapter chat` and `mmadapter serve`: the terminal chat and the OpenAI-compatible server (+ web UI).

Both take the same model options (`--base`, `--adapter`, …) and the same sampling options, whose
defaults come from the served model (LLaMA-Adapter's or ChatGLM's official demo settings).
Heavy imports happen inside `run`, so `mmadapter --help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys

from mmadapter.cli.options import (
    add_quantize_option,
    announce_loading,
    check_port_free,
    count,
    device_name,
    port_number,
    positive_count,
    positive_number,
    probability,
    quantization_option,
    temperature,
)
from mmadapter.core.templates import TEMPLATE_NAMES

API_KEY_ENV = "MMADAPTER_API_KEY"
#: What `--adapter NAME=PATH` accepts as NAME (a model id clients send).
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--base",
        help="base model: a folder (HF or Meta layout) or a preset (default: the one the adapter trained on, as its "
        "folder records it)",
    )
    group.add_argument(
        "--adapter",
        action="append",
        metavar="[NAME=]PATH",
        help="adapter folder or hub repo id (omit to chat with the base model); serve takes several, "
        "NAME=PATH naming each (default name: the folder's), and clients pick one by `model`",
    )
    group.add_argument("--revision", help="hub revision of --adapter")
    group.add_argument("--tokenizer", help="tokenizer folder (default: the base folder)")
    group.add_argument(
        "--template",
        choices=TEMPLATE_NAMES,
        help="prompt template (default: the adapter's recorded one, else the base's official one); chat: the "
        "tokenizer's chat template; auto: chat where the tokenizer has one",
    )
    group.add_argument("--dtype", help="float32, bfloat16 or float16 (default: bf16 on CUDA, fp32 on CPU)")
    group.add_argument("--device", type=device_name, help="cpu, cuda, cuda:1, … (default: cuda if available)")
    add_quantize_option(group)
    group.add_argument("--clip-weights", help="local CLIP weights for a multimodal adapter (overrides the saved path)")
    group.add_argument("--name", help="model id shown to API clients (default: the adapter folder's name)")
    sampling = parser.add_argument_group("sampling (defaults: the model's official demo settings)")
    sampling.add_argument("--max-new-tokens", type=positive_count, help="longest answer in tokens")
    sampling.add_argument("--temperature", type=temperature, help="0 = greedy")
    sampling.add_argument("--top-p", type=probability, help="nucleus sampling threshold (0 < p <= 1)")
    sampling.add_argument("--top-k", type=count, help="sample from the k most likely tokens (0 = off)")
    sampling.add_argument("--repetition-penalty", type=positive_number, help="penalise repeated tokens (1 = off)")
    sampling.add_argument("--seed", type=int, help="make sampling repeatable")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    chat = subparsers.add_parser(
        "chat",
        help="chat with an adapter in the terminal (streaming; /image PATH, /reset, /exit)",
        description="Terminal chat with history and streamed answers.",
    )
    _model_options(chat)
    chat.add_argument("--image", help="image to talk about (multimodal adapters)")
    chat.set_defaults(run=run_chat)

    serve = subparsers.add_parser(
        "serve",
        help="serve an adapter over the OpenAI chat-completions API (and a web UI with --ui)",
        description="OpenAI-compatible HTTP server (FastAPI + uvicorn): POST /v1/chat/completions, GET /v1/models, "
        "GET /health, GET /metrics (Prometheus), GET /openapi.json.",
    )
    _model_options(serve)
    batching = serve.add_argument_group("batching")
    batching.add_argument(
        "--max-batch", type=positive_count, default=16, help="requests decoded together (16; 1 = one at a time)"
    )
    batching.add_argument(
        "--merge",
        action="store_true",
        help="fold a single adapter into the base weights (faster; then no `base` model and adapter_scale 1 only)",
    )
    network = serve.add_argument_group("server")
    network.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    network.add_argument("--port", type=port_number, default=8000, help="API port (default 8000)")
    network.add_argument("--ui", action="store_true", help="also serve the web image-chat UI (needs the demo extra)")
    network.add_argument("--ui-port", type=port_number, default=7860, help="web UI port (default 7860)")
    network.add_argument(
        "--api-key",
        help=f"require 'Authorization: Bearer KEY' on every route but /health; prefer setting {API_KEY_ENV} "
        "(command lines are visible to other users)",
    )
    network.add_argument("--allow-remote-images", action="store_true", help="let clients send http(s) image URLs")
    network.add_argument(
        "--max-image-pixels", type=positive_count, help="largest image (width x height; default 64 million)"
    )
    limits = serve.add_argument_group("limits (each protects the server from clients)")
    limits.add_argument(
        "--max-queue", type=count, default=16, help="requests that may wait; more get 429 with Retry-After (16)"
    )
    limits.add_argument(
        "--max-connections", type=positive_count, default=128, help="open connections; more get 503 (128)"
    )
    limits.add_argument("--max-body-mb", type=positive_number, default=20.0, help="largest request body in MB (20)")
    limits.add_argument(
        "--max-prompt-tokens", type=positive_count, help="longest prompt in tokens (default: the model's context)"
    )
    limits.add_argument(
        "--header-timeout",
        type=positive_number,
        default=10.0,
        help="seconds to send a request's headers, else 408 (10)",
    )
    limits.add_argument(
        "--body-timeout", type=positive_number, default=60.0, help="seconds to send a request's body, else 408 (60)"
    )
    limits.add_argument(
        "--keep-alive-timeout", type=positive_number, default=5.0, help="seconds an idle connection stays open (5)"
    )
    serve.set_defaults(run=run_serve)


def _adapters(values: list[str] | None) -> dict[str, str]:
    """`--adapter` values -> model id -> folder or hub id (NAME=PATH, or a bare PATH named after its folder)."""
    from mmadapter.serve.loader import adapter_name

    adapters: dict[str, str] = {}
    for value in values or []:
        name, separator, source = value.partition("=")
        if not separator or os.path.exists(value) or not _ADAPTER_NAME.fullmatch(name):
            name, source = adapter_name(value), value
        if not source:
            raise ValueError(f"--adapter {value!r}: no path after {name + '='!r}")
        if name in adapters:
            raise ValueError(f"--adapter: the name {name!r} is given twice; name them NAME=PATH")
        adapters[name] = source
    return adapters


def _trained_base(adapters: dict[str, str]) -> tuple[str, str | None]:
    """(base, tokenizer) that every local adapter folder records it trained with, for a command without --base."""
    from mmadapter.adapters.io.checkpoint import recorded_base

    if not adapters:
        raise ValueError("--base: give the base model (a folder or a preset); with no --adapter there is none to read")
    recorded = set()
    for source in adapters.values():
        if not os.path.isdir(source):
            raise ValueError(
                f"--base: {source} is not a local folder, so the base it needs is not known here; pass --base"
            )
        recorded.add(recorded_base(source))
    if len(recorded) > 1:
        raise ValueError(f"--base: the adapters trained on different bases ({sorted(map(str, recorded))}); pass --base")
    ((base, tokenizer),) = recorded
    if not base or not (os.path.exists(base) or "/" not in base):  # a preset name, or a folder that is here
        raise ValueError(f"--base: the adapter does not record a base that is here ({base!r}); pass --base")
    return base, tokenizer


def _load(args: argparse.Namespace):
    # Imported on use, not at the top: the command line starts without loading what other commands need.
    from mmadapter.serve.loader import load_served_model, load_served_models

    overrides = {"clip_pretrained": args.clip_weights} if args.clip_weights else None
    quantization = quantization_option(args.quantize, args.device)
    adapters = _adapters(args.adapter)
    if args.base is None:
        args.base, recorded_tokenizer = _trained_base(adapters)
        args.tokenizer = args.tokenizer or recorded_tokenizer
        print(f"base: {args.base} (recorded by the adapter; --base to change)", file=sys.stderr, flush=True)
    routed = bool(adapters) and getattr(args, "merge", True) is False  # `serve` without --merge
    if len(adapters) > 1 and not routed:
        command = "serve --merge" if hasattr(args, "merge") else "chat"
        raise ValueError(f"--adapter: `mmadapter {command}` takes one adapter, got {len(adapters)}")
    if routed:
        if args.name and len(adapters) == 1 and "=" not in args.adapter[0]:
            adapters = {args.name: next(iter(adapters.values()))}
        served = load_served_models(
            args.base,
            adapters,
            tokenizer=args.tokenizer,
            template=args.template,
            dtype=args.dtype,
            device=args.device,
            quantization=quantization,
            adapter_overrides=overrides,
            revision=args.revision,
        )
    else:
        served = load_served_model(
            args.base,
            next(iter(adapters.values()), None),
            tokenizer=args.tokenizer,
            template=args.template,
            dtype=args.dtype,
            device=args.device,
            quantization=quantization,
            name=args.name or next(iter(adapters), None),
            adapter_overrides=overrides,
            revision=args.revision,
        )
    if args.template is None:
        _note_unrecorded_templates(adapters, served, routed)
    changes = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
    }
    served.update_defaults(**{k: v for k, v in changes.items() if v is not None})
    return served


def _note_unrecorded_templates(adapters: dict[str, str], served, routed: bool) -> None:
    """An adapter folder saved without its template (`save_adapter(model, dir)`) is asked with the family's
    official one; say so, since a model trained on a chat template would be asked the wrong way."""
    from mmadapter.adapters.io.checkpoint import read_adapter_config

    for name, source in adapters.items():
        if os.path.isdir(source) and read_adapter_config(source).get("prompt_template") is None:
            template = (served.variant(name) if routed else served).template
            print(
                f"note: {source} records no prompt template; asking it with {template.name!r} "
                "(--template chat for the tokenizer's chat template)",
                file=sys.stderr,
                flush=True,
            )


def run_chat(args: argparse.Namespace) -> int:
    _check_model_flags(args)
    announce_loading()
    # Imported on use, not at the top: the command line starts without loading what other commands need.
    from mmadapter.serve.terminal_chat import TerminalChat

    chat = TerminalChat(_load(args))
    if args.image and not chat.attach_image(args.image):
        return 2
    return chat.run()


def _check_model_flags(args: argparse.Namespace) -> None:
    """Flags that would do nothing are refused before anything loads, rather than silently ignored."""
    if not args.adapter:
        for flag, given in (("--revision", args.revision), ("--merge", getattr(args, "merge", False))):
            if given:
                raise ValueError(f"{flag} applies to an --adapter, and none is given")
    if args.name is not None and not _ADAPTER_NAME.fullmatch(args.name):
        raise ValueError(f"--name {args.name!r}: a model id is letters, digits, '.', '_' and '-', starting with one")


def run_serve(args: argparse.Namespace) -> int:
    _check_model_flags(args)
    check_port_free(args.host, args.port, "--port")  # before minutes of model loading, not after
    if args.ui:
        check_port_free(args.host, args.ui_port, "--ui-port")
    announce_loading()
    # Imported on use, not at the top: the command line starts without loading what other commands need.
    from mmadapter.serve.http_server import APIServer, ServerSettings, serve_forever
    from mmadapter.vision.images import DEFAULT_MAX_PIXELS

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = ServerSettings(
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        allow_remote_images=args.allow_remote_images,
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        max_image_pixels=args.max_image_pixels or DEFAULT_MAX_PIXELS,
        max_prompt_tokens=args.max_prompt_tokens,
        max_connections=args.max_connections,
        header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
        keep_alive_timeout=args.keep_alive_timeout,
    )
    served = _load(args)
    context = served.engine.context_length
    if args.max_prompt_tokens is not None and args.max_prompt_tokens >= context:
        print(
            f"note: --max-prompt-tokens {args.max_prompt_tokens} is beyond the model's context ({context} tokens): "
            f"prompts are limited to {context - 1}",
            file=sys.stderr,
            flush=True,
        )
    server = APIServer(served, settings)
    server.start_background()
    ids = served.model_ids()
    named = f"model id {ids[0]!r}" if len(ids) == 1 else f"model ids {', '.join(map(repr, ids))}; default {ids[0]!r}"
    print(f"OpenAI-compatible API: {server.url}/v1  ({named})", flush=True)
    if settings.api_key:
        print("API key required (Authorization: Bearer …)", flush=True)
    elif args.host not in ("127.0.0.1", "localhost", "::1"):
        warning = f"warning: listening on {args.host} without an API key; anyone who can reach it can use the model"
        print(f"{warning} (set {API_KEY_ENV})", file=sys.stderr, flush=True)
    ui = None
    if args.ui:
        from mmadapter.serve.web_demo import launch_ui

        ui = launch_ui(served, host=args.host, port=args.ui_port, worker=server.worker, block=False)
        print(f"web UI: {ui.local_url}", flush=True)
    try:
        serve_forever(server)
    finally:
        if ui is not None:
            ui.close()
    return 0
