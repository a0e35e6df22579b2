"""What the benchmark scripts share: where their JSON goes and how it is written."""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Table:
    """A results table as the benchmark prints it; stored in the JSON under "tables" so the documentation
    renders the very same cells (docs/hooks.py: `<!-- bench-table: NAME.json#TABLE -->`)."""

    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"a row of {len(cells)} cells for {len(self.columns)} columns")
        self.rows.append([str(cell) for cell in cells])

    def print(self) -> None:
        widths = [max(len(cell) for cell in column) for column in zip(self.columns, *self.rows, strict=True)]
        for row in (self.columns, *self.rows):
            print(
                "  ".join(
                    cell.rjust(width) if i else cell.ljust(width)
                    for i, (cell, width) in enumerate(zip(row, widths, strict=True))
                )
            )

    def to_json(self) -> dict[str, list]:
        return {"columns": self.columns, "rows": self.rows}


class GPUClock:
    """The median SM clock (MHz) of a CUDA device while a block runs, read through NVML every 50 ms.

    A GPU left to its own power management can stay near its idle clock under light, launch-bound work (a small
    model decoding a few rows): on the first H200 lease the serving benchmark's per-token times moved between
    two levels 4-10x apart, around the 5.7x between that GPU's boost and idle SM clocks. Recording the clock
    beside each timing tells such runs apart. Off CUDA, or without NVML (nvidia-ml-py), it records nothing.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GPUClock:
        if self.device.startswith("cuda") and self._read() is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()

    def _read(self) -> int | None:
        try:
            return torch.cuda.clock_rate(self.device)
        except Exception:  # no NVML binding, or a device it cannot query
            return None

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            if (mhz := self._read()) is not None:
                self.samples.append(mhz)

    @property
    def median_mhz(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None


def write_results(document: dict[str, Any], out: Path, tables: dict[str, Table] | None = None) -> None:
    """Write one benchmark's JSON (creating its folder), with its printed `tables`, and say where."""
    if tables:
        document = {**document, "tables": {name: table.to_json() for name, table in tables.items()}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {out}")


def saved_for_backward(forward: Callable[[], Any], model: nn.Module) -> tuple[Any, int]:
    """(forward's result, bytes autograd keeps for backward), each storage once. The model's weights are
    left out: autograd saves them too, but they are counted as weights already. Storages are told apart by
    their identity (`_cdata`), not their address, so this also counts a model on the meta device."""
    weights = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        saved.setdefault(storage._cdata, storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = forward()
    return result, sum(n for pointer, n in saved.items() if pointer not in weights)


def add_device_arguments(parser: argparse.ArgumentParser, threads_help: str = "torch CPU threads (default 1)") -> None:
    """--device (CUDA when there is one), --dtype and --threads, as the generation benchmarks take them."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    parser.add_argument("--threads", type=int, default=1, help=threads_help)


def cpu_name() -> str:
    """The CPU's model name (the development VM's host has changed between sessions, and so have its figures)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def run_header(benchmark: str, args: argparse.Namespace, dtype: torch.dtype | str) -> dict[str, Any]:
    """The fields a benchmark's JSON opens with: what ran, when, on which device, in which dtype, on how many
    threads (for the scripts that take `add_device_arguments`)."""
    on_cuda = args.device.startswith("cuda")
    return {
        "benchmark": benchmark,
        "date": date.today().isoformat(),
        "device": args.device,
        "device_name": torch.cuda.get_device_name(args.device) if on_cuda else cpu_name(),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": args.threads,
        "torch": torch.__version__,
    }


def chosen_dtype(args: argparse.Namespace) -> torch.dtype:
    """--dtype, or bfloat16 on CUDA and float32 on CPU."""
    if args.dtype:
        return getattr(torch, args.dtype)
    return torch.bfloat16 if args.device.startswith("cuda") else torch.float32
