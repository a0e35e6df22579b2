"""Import the released LLaMA-Adapter V2 multimodal checkpoints (`BIAS-7B.pth`, `LORA-BIAS-7B.pth`, …).

Layout (spec llama-adapter.md §3.7): a dict with `model` (state dict) and `config`
({w_bias, w_lora, lora_rank}). Keys and where they go on a Hugging Face LLaMA + open_clip model:

| official key | mmadapter parameter |
| --- | --- |
| `adapter_query.weight` (L·K, D) | rows [i·K, (i+1)·K) -> `model.layers.{N-L+i}.self_attn.adapter_prompt` |
| `llama.layers.n.attention.gate` (1, H, 1, 1) | `…self_attn.adapter_gate` (H,); layers below N-L are unused |
| `llama.layers.n.attention.new_gate` (LoRA files) | folded in: gate_tanh off, gate = tanh(gate)·new_gate |
| `llama.layers.n.attention.wq.bias` | `…self_attn.q_proj.adapter_bias`, RoPE row permutation applied |
| `….wk/wv/wo.bias`, `feed_forward.w1/w3/w2.bias` | `k_proj/v_proj/o_proj`, `mlp.gate_proj/up_proj/down_proj` |
| `….attention_norm.weight`, `ffn_norm.weight`, `llama.norm.weight` | `input_layernorm`, `post_attention_layernorm`, `model.norm` |
| `….lora_wq_l1.weight` (r, D) / `lora_wq_l2.weight` (D, r) | peft `q_proj.lora_A.default` / `lora_B.default` (q/k B rows permuted) |
| `clip_proj.*`, `clip_proj_norm.*`, `visual_query.*`, `visual_blocks.*`, `visual_proj*` | `visual_projector.<same>` |

The CLIP encoder is not in the file (the official code loads OpenAI's ViT-L/14); its path goes in
`clip_pretrained`. Official models saw BGR images read as RGB, so `image_channel_order` is 'bgr'.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmadapter.adapters.backbones.loading import read_base_config
from mmadapter.adapters.backbones.meta_llama import permute_rotary_rows
from mmadapter.adapters.backbones.presets import build_base_model
from mmadapter.adapters.io.checkpoint import load_adapter_tensors, save_adapter
from mmadapter.adapters.methods.base import attach_adapter
from mmadapter.adapters.methods.bias_scale import LINEAR_PATHS
from mmadapter.adapters.methods.llama_adapter_v2 import (
    LORA_ADAPTER_NAME,
    PROJECTOR_ATTRIBUTE,
    LlamaAdapterV2Config,
)

#: Official linear name -> mmadapter short name (`LINEAR_PATHS`).
OFFICIAL_LINEARS = {"wq": "q", "wk": "k", "wv": "v", "wo": "o", "w1": "gate", "w3": "up", "w2": "down"}
#: Biases the released multimodal model creates whenever w_bias is on (zeros when absent).
RELEASED_BIAS_LINEARS = ("q", "o", "gate", "up", "down")
_VISUAL_PREFIXES = (
    "clip_proj.",
    "clip_proj_norm.",
    "visual_query.",
    "visual_blocks.",
    "visual_proj.",
    "visual_proj_norm.",
)
_LAYER_KEY = re.compile(r"llama\.layers\.(\d+)\.(attention|feed_forward)\.(.+)")
_NORM_KEY = re.compile(r"llama\.layers\.(\d+)\.(attention_norm|ffn_norm)\.weight")
_BIAS = re.compile(r"(w[qkvo123])\.bias")
_LORA = re.compile(r"lora_(w[qkvo123])_l([12])\.weight")
_HF_NORMS = {"attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def read_official_v2(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, config dict) of a released file, read with `weights_only=True`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict, found {type(data).__name__}")
    state = data["model"] if isinstance(data.get("model"), dict) else data
    config = data.get("config") if isinstance(data.get("config"), dict) else {}
    # The official training loader renames an old misspelling (util/misc.py `load_model`).
    state = {key.replace("llma", "llama"): value for key, value in state.items()}
    return state, config


def convert_official_v2(
    state: dict[str, torch.Tensor],
    file_config: dict[str, Any],
    base_config: Any,
    *,
    clip_model: str = "ViT-L-14-quickgelu",
    clip_pretrained: str | None = None,
    visual_heads: int = 16,
    source: str = "checkpoint",
) -> tuple[LlamaAdapterV2Config, dict[str, torch.Tensor]]:
    """Official tensors -> (config, float32 tensors under mmadapter's parameter names)."""
    if "adapter_query.weight" not in state:
        raise ValueError(f"{source}: no 'adapter_query.weight'; not a LLaMA-Adapter V2 multimodal file")
    num_layers = base_config.num_hidden_layers
    num_heads = base_config.num_attention_heads
    num_kv_heads = getattr(base_config, "num_key_value_heads", None) or num_heads
    has_vision = "visual_query.weight" in state
    prompts = state["adapter_query.weight"].float()
    prompt_length = state["visual_query.weight"].shape[0] if has_vision else 10
    if prompts.shape[0] % prompt_length or prompts.shape[0] // prompt_length > num_layers:
        raise ValueError(
            f"{source}: adapter_query has {prompts.shape[0]} rows, not a multiple of K={prompt_length} "
            f"for at most {num_layers} layers"
        )
    if prompts.shape[1] != base_config.hidden_size:
        raise ValueError(f"{source}: prompts have width {prompts.shape[1]}, the base model {base_config.hidden_size}")
    first = num_layers - prompts.shape[0] // prompt_length

    layer_keys = {}
    for key, tensor in state.items():
        match = _LAYER_KEY.fullmatch(key)
        if match:
            layer_keys[(int(match.group(1)), match.group(3))] = tensor
    biases = {(n, OFFICIAL_LINEARS[m.group(1)]): t for (n, k), t in layer_keys.items() if (m := _BIAS.fullmatch(k))}
    loras = {
        (n, OFFICIAL_LINEARS[m.group(1)], m.group(2)): t
        for (n, k), t in layer_keys.items()
        if (m := _LORA.fullmatch(k))
    }
    norms = {key: t for key, t in state.items() if _NORM_KEY.fullmatch(key) or key == "llama.norm.weight"}
    new_gates = {n: t for (n, k), t in layer_keys.items() if k == "new_gate"}

    bias_linears = set(short for _, short in biases)
    if file_config.get("w_bias", bool(biases)):
        bias_linears |= set(RELEASED_BIAS_LINEARS)
    lora_rank = 0
    if loras or file_config.get("w_lora", False):
        lora_rank = next(iter(loras.values())).shape[0] if loras else int(file_config.get("lora_rank", 16))
    order = list(LINEAR_PATHS)
    instruction = [*(["bias"] if bias_linears else []), *(["norms"] if norms else []), *(["lora"] if lora_rank else [])]
    options: dict[str, Any] = {}
    if has_vision:
        width = state["clip_proj.weight"].shape[0]
        blocks = {int(k.split(".")[1]) for k in state if k.startswith("visual_blocks.")}
        options = {
            "visual_width": width,
            "visual_depth": len(blocks),
            "visual_heads": visual_heads,
            "visual_mlp_ratio": state["visual_blocks.0.mlp.fc1.weight"].shape[0] / width,
        }
    config = LlamaAdapterV2Config(
        prompt_length=prompt_length,
        first_adapted_layer=first,
        gate_tanh=not new_gates,
        bias_linears=sorted(bias_linears, key=order.index),
        scale_linears=(),
        lora_rank=lora_rank,
        lora_linears=sorted({short for _, short, _ in loras}, key=order.index) if loras else tuple(order),
        visual_projector="v2" if has_vision else "none",
        visual_fusion="all",
        clip_model=clip_model,
        clip_pretrained=clip_pretrained,
        image_channel_order="bgr",
        text_only_image="zeros",
        caption_trains=["projector", "prompts", "gates"] if has_vision else [],
        instruction_trains=instruction if has_vision else ["prompts", "gates", *instruction],
        **options,
    )

    tensors: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(range(first, num_layers)):
        prefix = f"model.layers.{layer}.self_attn."
        tensors[prefix + "adapter_prompt"] = prompts[i * prompt_length : (i + 1) * prompt_length]
        if (layer, "gate") not in layer_keys:
            raise ValueError(f"{source}: no 'llama.layers.{layer}.attention.gate'")
        gate = layer_keys[(layer, "gate")].float().reshape(-1)
        if gate.numel() not in (1, num_heads):
            raise ValueError(f"{source}: gate of layer {layer} has {gate.numel()} values; expected 1 or {num_heads}")
        gate = gate.expand(num_heads)
        if new_gates:
            # tanh(g) * new_gate is the effective gate; keep it raw so the product is exact.
            gate = gate.tanh() * new_gates[layer].float().reshape(())
        tensors[prefix + "adapter_gate"] = gate
    for layer in range(num_layers):
        for short in config.bias_linears:
            name = _linear_parameter(layer, short, config, "adapter_bias")
            out_features = _out_features(base_config, short)
            bias = biases.get((layer, short), torch.zeros(out_features)).float()
            tensors[name] = _to_hf_rows(bias, short, num_heads, num_kv_heads)
        for (n, short, which), weight in loras.items():
            if n != layer:
                continue
            path = f"model.layers.{layer}.{LINEAR_PATHS[short]}"
            if which == "1":
                tensors[f"{path}.lora_A.{LORA_ADAPTER_NAME}.weight"] = weight.float()
            else:
                tensors[f"{path}.lora_B.{LORA_ADAPTER_NAME}.weight"] = _to_hf_rows(
                    weight.float(), short, num_heads, num_kv_heads
                )
    for key, tensor in norms.items():
        match = _NORM_KEY.fullmatch(key)
        name = f"model.layers.{match.group(1)}.{_HF_NORMS[match.group(2)]}.weight" if match else "model.norm.weight"
        tensors[name] = tensor.float()
    for key, tensor in state.items():
        if key.startswith(_VISUAL_PREFIXES):
            tensors[f"{PROJECTOR_ATTRIBUTE}.{key}"] = tensor.float()
    return config, {name: t.contiguous() for name, t in tensors.items()}


def _linear_parameter(layer: int, short: str, config: LlamaAdapterV2Config, leaf: str) -> str:
    wrapped = config.lora_rank > 0 and short in config.lora_linears
    return f"model.layers.{layer}.{LINEAR_PATHS[short]}{'.base_layer' if wrapped else ''}.{leaf}"


def _out_features(base_config: Any, short: str) -> int:
    if short in ("gate", "up"):
        return base_config.intermediate_size
    if short in ("k", "v"):
        heads = getattr(base_config, "num_key_value_heads", None) or base_config.num_attention_heads
        return heads * (base_config.hidden_size // base_config.num_attention_heads)
    return base_config.hidden_size


def _to_hf_rows(rows: torch.Tensor, short: str, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """q/k output rows follow Meta's interleaved rotary layout; HF splits halves (spec §1.8)."""
    if short == "q":
        return permute_rotary_rows(rows, num_heads)
    if short == "k":
        return permute_rotary_rows(rows, num_kv_heads)
    return rows


def load_official_v2(
    model: nn.Module,
    path: str | Path,
    *,
    clip_model: str = "ViT-L-14-quickgelu",
    clip_pretrained: str | None = None,
    visual_heads: int = 16,
) -> nn.Module:
    """Attach the adapter of a released V2 file to a fresh HF LLaMA `model` (in place) and load it."""
    state, file_config = read_official_v2(path)
    config, tensors = convert_official_v2(
        state,
        file_config,
        model.config,
        clip_model=clip_model,
        clip_pretrained=clip_pretrained,
        visual_heads=visual_heads,
        source=str(path),
    )
    attach_adapter(model, config)
    load_adapter_tensors(model, tensors, str(path))
    return model


def convert_official_v2_file(
    src: str | Path,
    dst: str | Path,
    base: str | Path,
    *,
    clip_model: str = "ViT-L-14-quickgelu",
    clip_pretrained: str | None = None,
) -> str:
    """`mmadapter convert official-v2`: a released file -> an mmadapter adapter folder (no weights loaded)."""

    state, file_config = read_official_v2(src)
    base_config = read_base_config(base)
    config, tensors = convert_official_v2(
        state, file_config, base_config, clip_model=clip_model, clip_pretrained=clip_pretrained, source=str(src)
    )
    model = build_base_model(base_config, device="meta")
    attach_adapter(model, config)
    load_adapter_tensors(model, tensors, str(src))
    save_adapter(model, dst, prompt_template="alpaca")
    gates = [t for name, t in tensors.items() if name.endswith("adapter_gate")]
    largest = max(t.abs().max().item() for t in gates)
    parts = [
        f"{len(gates)} layers x {config.prompt_length} prompts (from layer {config.first_adapted_layer})",
        f"bias on {','.join(config.bias_linears) or 'none'}",
        f"LoRA r={config.lora_rank}" if config.lora_rank else "no LoRA",
        f"largest |gate| {largest:.4f}" + ("" if config.gate_tanh else " (tanh(gate)·new_gate folded)"),
    ]
    note = "" if clip_pretrained else "; pass clip_pretrained= to load_adapter (CLIP weights are not in the file)"
    return f"wrote {dst}: {'; '.join(parts)}{note}"
