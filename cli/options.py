"""Small helpers shared by command-line parsers."""

from __future__ import annotations

import argparse
import contextlib
import errno
import socket
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from mmadapter.core.quantization import Quantization


def parse_assignments(items: list[str] | None) -> dict[str, Any]:
    """`["a=1", "b.c=true"]` -> `{"a": 1, "b.c": True}`; values are read as YAML scalars."""
    result: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected key=value, got {item!r}")
        result[key.strip()] = yaml.safe_load(value)
    return result


def flag_value(parse: Callable[[str], Any], accept: Callable[[Any], bool], what: str) -> Callable[[str], Any]:
    """An argparse type: the text `parse`d, if `accept`ed; else an error saying it is not `what`."""

    def convert(value: str) -> Any:
        with contextlib.suppress(ValueError):
            if accept(number := parse(value)):
                return number
        raise argparse.ArgumentTypeError(f"{value!r} is not {what}")

    return convert


positive_number = flag_value(float, lambda number: 0 < number < float("inf"), "a positive number")
positive_count = flag_value(int, lambda number: number >= 1, "a whole number of at least 1")
count = flag_value(int, lambda number: number >= 0, "a whole number (0 or more)")
temperature = flag_value(float, lambda number: 0 <= number < float("inf"), "a temperature (0 = greedy, or more)")
probability = flag_value(float, lambda number: 0 < number <= 1, "a probability above 0 and at most 1")


def port_number(value: str) -> int:
    """argparse type of a TCP port: 1-65535, or 0 for any free port (the server prints the one it got)."""
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number (1-65535, or 0 for any free port)") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(
            f"{port} is not a port number: use 1-65535 (e.g. 8000), or 0 for any free port"
        )
    return port


def device_name(value: str) -> str:
    """argparse type of a torch device that this machine has: cpu, cuda, cuda:N, mps."""
    import torch  # imported here, not at the top: `mmadapter --help` starts without torch

    try:
        device = torch.device(value)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a device: use cpu, cuda, cuda:1 or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{value}: this machine has no CUDA device that torch can use; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise argparse.ArgumentTypeError(f"{value}: this machine has {count} CUDA device(s), cuda:0-{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{value}: Apple's MPS is not available here; use cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{value}: mmadapter runs on cpu, cuda or mps")
    return value


def add_quantize_option(group: argparse._ActionsContainer) -> None:
    """`--quantize 4|8` of the commands that load a base model to run it (chat, serve, eval)."""
    group.add_argument(
        "--quantize",
        type=int,
        choices=(4, 8),
        help="store the base's linear layers in 4 bits (NF4, bf16 compute) or 8 bits (LLM.int8); needs "
        "pip install 'mmadapter[quantization]'",
    )


def quantization_option(bits: int | None, device: str | None) -> Quantization | None:
    """`--quantize` as the loaders take it, checked for this machine (None: not given)."""
    if bits is None:
        return None
    # Imported on use: `mmadapter --help` starts without torch.
    from mmadapter.adapters.backbones.quantization import check_quantization
    from mmadapter.core.quantization import Quantization

    quantization = Quantization(bits=bits)
    check_quantization(quantization, device or default_device(), "--quantize")
    return quantization


def default_device() -> str:
    """Where a model runs when --device is not given: CUDA when available."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_port_free(host: str, port: int, flag: str) -> None:
    """Fail before loading a model when the server could not listen on (host, port)."""
    if port == 0:  # any free port: nothing to check
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise ValueError(f"--host {host}: not an address of this machine (e.g. 127.0.0.1 or 0.0.0.0)") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is fine
        try:
            probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise ValueError(f"{flag} {port}: {host}:{port} is in use; pick another port with {flag}") from None
            if error.errno in (errno.EACCES, errno.EPERM):
                raise ValueError(f"{flag} {port}: not allowed to listen on it here; use a port above 1023") from None
            raise ValueError(f"--host {host}: cannot listen there ({error.strerror})") from None


def announce_loading(what: str = "torch and transformers") -> None:
    """The first line a model-loading command prints, before its heavy imports: they take seconds, and
    the first run after installing compiles caches for a minute or more, which must not look like a hang."""
    print(
        f"mmadapter: loading {what} (the first run after installing also compiles caches: up to a minute or two)",
        file=sys.stderr,
        flush=True,
    )
