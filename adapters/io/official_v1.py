"""Import the officially released LLaMA-Adapter V1 file (`llama_adapter_len10_layer30_release.pth`).

That file is a flat state dict: `adapter_query.weight` (L·K, D), one table holding every
adapted layer's prompt (rows [i·K, (i+1)·K) go to block N - L + i), and `layers.N.attention.gate`
for all N layers, per-head (1, H, 1, 1) or, in the very first release, a scalar (1,). Prompts
need no RoPE permutation for HF-layout LLaMA: both sides of Q·Kp^T come from the same permuted
projections (spec §1.8).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from mmadapter.adapters.methods.llama_adapter_v1 import LlamaAdapterV1Config, adapted_layer_indices
from mmadapter.core.files import read_torch_file

_GATE_KEY = re.compile(r"layers\.(\d+)\.attention\.gate")


def load_official_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A released `.pth` read with `weights_only=True` (unwrapping a `model` entry if present)."""
    state = read_torch_file(path)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


def convert_official_v1(
    state: dict[str, torch.Tensor],
    num_heads: int,
    prompt_length: int = 10,
    gate_tanh: bool = True,
    source: str = "checkpoint",
) -> tuple[LlamaAdapterV1Config, dict[str, torch.Tensor]]:
    """Official V1 tensors -> (config, mmadapter parameter names and shapes)."""
    if "adapter_query.weight" not in state:
        raise ValueError(f"{source}: no 'adapter_query.weight'; not a LLaMA-Adapter V1 file")
    prompts = state["adapter_query.weight"].float()
    gates = {int(m.group(1)): t for k, t in state.items() if (m := _GATE_KEY.fullmatch(k))}
    if not gates:
        raise ValueError(f"{source}: no 'layers.N.attention.gate' keys")
    num_layers = max(gates) + 1
    if prompts.shape[0] % prompt_length:
        raise ValueError(f"{source}: {prompts.shape[0]} prompt rows is not a multiple of prompt_length={prompt_length}")
    config = LlamaAdapterV1Config(
        prompt_length=prompt_length, adapted_layers=prompts.shape[0] // prompt_length, gate_tanh=gate_tanh
    )
    converted = {}
    for i, layer in enumerate(adapted_layer_indices(num_layers, config.adapted_layers)):
        prefix = f"model.layers.{layer}.self_attn."
        converted[prefix + "adapter_prompt"] = prompts[i * prompt_length : (i + 1) * prompt_length].clone()
        gate = gates[layer].float().reshape(-1)
        if gate.numel() not in (1, num_heads):
            raise ValueError(f"{source}: gate of layer {layer} has {gate.numel()} values; expected 1 or {num_heads}")
        converted[prefix + "adapter_gate"] = gate.expand(num_heads).clone()
    return config, converted
