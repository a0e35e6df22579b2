"""Helpers shared by the serving tests (imported by bare name: tests/ folders are not packages)."""

from __future__ import annotations

import torch

#: Model id of the `served` fixture.
MODEL_NAME = "tiny-v1"


def open_gates(model: torch.nn.Module, value: float = 0.5) -> None:
    """Non-zero gates, so the adapter really changes the output (zero-init would hide bugs)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("adapter_gate"):
                param.fill_(value)


def randomize_adapter(model: torch.nn.Module, seed: int = 1) -> None:
    """Move every adapter parameter off its zero/one init (as training would), so merging really matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "adapter_" in name or "lora_" in name:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    open_gates(model)
