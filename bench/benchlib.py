"""What the benchmark scripts share: where their JSON goes and how it is written."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"


def write_results(document: dict[str, Any], out: Path) -> None:
    """Write one benchmark's JSON (creating its folder) and say where."""
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
