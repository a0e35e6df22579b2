"""Import the released LLaMA-Adapter V2 checkpoints, in either of their two layouts (told apart by the keys).

Multimodal (`BIAS-7B.pth`, `LORA-BIAS-7B.pth`, …; spec llama-adapter.md §3.7): a dict with `model` (state
dict) and `config` ({w_bias, w_lora, lora_rank}). Keys and where they go on a Hugging Face LLaMA + open_clip model:

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

Chat-65B (`chat_llama65b_bias_scale_norm_tuning_v1.pth`; spec §4, `llama_adapter_v2_chat65b/llama/model.py`):
`{"model": …}` with bare Meta names and no prompts or gates. Every linear is y = W(x·s) + b
(`forward_linear_with_scale_and_bias`), which is the `chat65b` preset of llama-adapter-v2:

| official key | mmadapter parameter |
| --- | --- |
| `layers.n.attention.wq_bias`, `wk_bias` | `…self_attn.q_proj/k_proj.adapter_bias`, RoPE row permutation applied |
| `layers.n.attention.wv_bias`, `wo_bias`, `feed_forward.w1/w3/w2_bias` | `…adapter_bias` of v/o/gate/up/down |
| `layers.n.attention.wq_scale` … `feed_forward.w2_scale` | `…adapter_scale` (input side: no permutation) |
| `layers.n.attention_norm.weight`, `ffn_norm.weight`, `norm.weight` | the three RMSNorm weights, as above |
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmadapter.adapters.backbones.loading import read_base_config
from mmadapter.adapters.backbones.meta_llama import permute_rotary_rows
from mmadapter.adapters.backbones.presets import build_base_model
from mmadapter.adapters.io.checkpoint import load_adapter_tensors, save_adapter
from mmadapter.adapters.methods.base import attach_adapter, make_config
from mmadapter.adapters.methods.bias_scale import LINEAR_PATHS
from mmadapter.adapters.methods.llama_adapter_v2 import (
    LORA_ADAPTER_NAME,
    PROJECTOR_ATTRIBUTE,
    LlamaAdapterV2Config,
)
from mmadapter.core.files import read_torch_file

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
#: Prompt template of each released layout (`format_prompt` of the multimodal demo; chat_demo.py's conversation).
LAYOUT_TEMPLATES = {"multimodal": "alpaca", "chat65b": "chat65b"}
# Multimodal keys start with `llama.`; chat-65B keys are the bare Meta names.
_LAYER_KEY = re.compile(r"(?:llama\.)?layers\.(\d+)\.(attention|feed_forward)\.(.+)")
_NORM_KEY = re.compile(r"(?:llama\.)?layers\.(\d+)\.(attention_norm|ffn_norm)\.weight")
_FINAL_NORM_KEYS = ("llama.norm.weight", "norm.weight")
# A bias is `wq.bias` in multimodal files and `wq_bias` in chat-65B; only chat-65B has scales.
_BIAS = re.compile(r"(w[qkvo123])[._]bias")
_SCALE = re.compile(r"(w[qkvo123])_scale")
_CHAT65B_KEY = re.compile(r"layers\.\d+\.(?:attention|feed_forward)\.w[qkvo123]_(?:bias|scale)")
_LORA = re.compile(r"lora_(w[qkvo123])_l([12])\.weight")
_HF_NORMS = {"attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


@dataclasses.dataclass
class _LayerTerms:
    """A file's per-layer tensors, by (layer, mmadapter short linear name) where they belong to a linear."""

    biases: dict[tuple[int, str], torch.Tensor]
    scales: dict[tuple[int, str], torch.Tensor]
    loras: dict[tuple[int, str, str], torch.Tensor]
    gates: dict[int, torch.Tensor]
    new_gates: dict[int, torch.Tensor]
    norms: dict[str, torch.Tensor]
    """HF parameter name -> RMSNorm weight."""


def read_official_v2(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, config dict) of a released file, read with `weights_only=True`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    data = read_torch_file(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict, found {type(data).__name__}")
    state = data["model"] if isinstance(data.get("model"), dict) else data
    config = data.get("config") if isinstance(data.get("config"), dict) else {}
    # The official training loader renames an old misspelling (util/misc.py `load_model`).
    state = {key.replace("llma", "llama"): value for key, value in state.items()}
    return state, config


def official_v2_layout(state: dict[str, torch.Tensor], source: str = "checkpoint") -> str:
    """'multimodal' (BIAS-7B, LORA-BIAS-7B: `adapter_query.weight`) or 'chat65b' (bare `…wq_bias`/`…_scale` keys)."""
    if "adapter_query.weight" in state:
        return "multimodal"
    if any(_CHAT65B_KEY.fullmatch(key) for key in state):
        return "chat65b"
    raise ValueError(
        f"{source}: not a LLaMA-Adapter V2 file: no 'adapter_query.weight' (multimodal layout) and no "
        "'layers.N.attention.wq_bias' / '…_scale' keys (chat-65B layout)"
    )


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
    """Official tensors (either layout) -> (config, float32 tensors under mmadapter's parameter names)."""
    terms = _layer_terms(state)
    if official_v2_layout(state, source) == "chat65b":
        config = _chat65b_config(terms, base_config, source)
    else:
        config = _multimodal_config(
            state, file_config, base_config, terms, clip_model, clip_pretrained, visual_heads, source
        )
    tensors = _prompt_tensors(state, terms, config, base_config, source) if config.has_prompts else {}
    tensors |= _linear_tensors(terms, config, base_config)
    tensors |= terms.norms
    for key, tensor in state.items():
        if key.startswith(_VISUAL_PREFIXES):
            tensors[f"{PROJECTOR_ATTRIBUTE}.{key}"] = tensor.float()
    return config, {name: t.contiguous() for name, t in tensors.items()}


def _layer_terms(state: dict[str, torch.Tensor]) -> _LayerTerms:
    """Sort a file's per-layer keys (either layout) into biases, scales, LoRA, gates and norms."""
    terms = _LayerTerms({}, {}, {}, {}, {}, {})
    for key, tensor in state.items():
        if key in _FINAL_NORM_KEYS:
            terms.norms["model.norm.weight"] = tensor.float()
        elif match := _NORM_KEY.fullmatch(key):
            terms.norms[f"model.layers.{match.group(1)}.{_HF_NORMS[match.group(2)]}.weight"] = tensor.float()
        elif match := _LAYER_KEY.fullmatch(key):
            _sort_layer_key(terms, int(match.group(1)), match.group(3), tensor)
    return terms


def _sort_layer_key(terms: _LayerTerms, layer: int, name: str, tensor: torch.Tensor) -> None:
    if match := _BIAS.fullmatch(name):
        terms.biases[(layer, OFFICIAL_LINEARS[match.group(1)])] = tensor
    elif match := _SCALE.fullmatch(name):
        terms.scales[(layer, OFFICIAL_LINEARS[match.group(1)])] = tensor
    elif match := _LORA.fullmatch(name):
        terms.loras[(layer, OFFICIAL_LINEARS[match.group(1)], match.group(2))] = tensor
    elif name == "gate":
        terms.gates[layer] = tensor
    elif name == "new_gate":
        terms.new_gates[layer] = tensor


def _chat65b_config(terms: _LayerTerms, base_config: Any, source: str) -> LlamaAdapterV2Config:
    """The `chat65b` preset, with the bias/scale linears and norms the file has (the release: all of them)."""
    layers = 1 + max(layer for layer, _ in (*terms.biases, *terms.scales))
    if layers != base_config.num_hidden_layers:
        raise ValueError(
            f"{source}: a chat-65B file for {layers} layers, the base has {base_config.num_hidden_layers} "
            "(the released file needs LLaMA-65B: base llama-65b)"
        )
    order = list(LINEAR_PATHS)
    bias_linears = sorted({short for _, short in terms.biases}, key=order.index)
    scale_linears = sorted({short for _, short in terms.scales}, key=order.index)
    trains = [*(["bias"] if bias_linears else []), *(["scale"] if scale_linears else [])]
    return make_config(
        "llama-adapter-v2",
        "chat65b",
        bias_linears=bias_linears,
        scale_linears=scale_linears,
        instruction_trains=[*trains, *(["norms"] if terms.norms else [])],
    )


def _multimodal_config(
    state: dict[str, torch.Tensor],
    file_config: dict[str, Any],
    base_config: Any,
    terms: _LayerTerms,
    clip_model: str,
    clip_pretrained: str | None,
    visual_heads: int,
    source: str,
) -> LlamaAdapterV2Config:
    """Prompts in the last layers, gates, biases (q o gate up down when w_bias), LoRA, vision (spec §3.7)."""
    num_layers = base_config.num_hidden_layers
    has_vision = "visual_query.weight" in state
    prompts = state["adapter_query.weight"]
    prompt_length = state["visual_query.weight"].shape[0] if has_vision else 10
    if prompts.shape[0] % prompt_length or prompts.shape[0] // prompt_length > num_layers:
        raise ValueError(
            f"{source}: adapter_query has {prompts.shape[0]} rows, not a multiple of K={prompt_length} "
            f"for at most {num_layers} layers"
        )
    if prompts.shape[1] != base_config.hidden_size:
        raise ValueError(f"{source}: prompts have width {prompts.shape[1]}, the base model {base_config.hidden_size}")
    bias_linears = {short for _, short in terms.biases}
    if file_config.get("w_bias", bool(terms.biases)):
        bias_linears |= set(RELEASED_BIAS_LINEARS)
    lora_rank = 0
    if terms.loras or file_config.get("w_lora", False):
        lora_rank = next(iter(terms.loras.values())).shape[0] if terms.loras else int(file_config.get("lora_rank", 16))
    order = list(LINEAR_PATHS)
    instruction = [
        *(["bias"] if bias_linears else []),
        *(["norms"] if terms.norms else []),
        *(["lora"] if lora_rank else []),
    ]
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
    return LlamaAdapterV2Config(
        prompt_length=prompt_length,
        first_adapted_layer=num_layers - prompts.shape[0] // prompt_length,
        gate_tanh=not terms.new_gates,
        bias_linears=sorted(bias_linears, key=order.index),
        scale_linears=(),
        lora_rank=lora_rank,
        lora_linears=sorted({short for _, short, _ in terms.loras}, key=order.index) if terms.loras else tuple(order),
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


def _prompt_tensors(
    state: dict[str, torch.Tensor], terms: _LayerTerms, config: LlamaAdapterV2Config, base_config: Any, source: str
) -> dict[str, torch.Tensor]:
    """Each adapted layer's K prompt rows and its per-head gate (tanh(gate)·new_gate folded for LoRA files)."""
    num_heads = base_config.num_attention_heads
    prompts = state["adapter_query.weight"].float()
    k = config.prompt_length
    tensors = {}
    for i, layer in enumerate(range(config.first_adapted_layer, base_config.num_hidden_layers)):
        prefix = f"model.layers.{layer}.self_attn."
        tensors[prefix + "adapter_prompt"] = prompts[i * k : (i + 1) * k]
        if layer not in terms.gates:
            raise ValueError(f"{source}: no 'llama.layers.{layer}.attention.gate'")
        gate = terms.gates[layer].float().reshape(-1)
        if gate.numel() not in (1, num_heads):
            raise ValueError(f"{source}: gate of layer {layer} has {gate.numel()} values; expected 1 or {num_heads}")
        gate = gate.expand(num_heads)
        if terms.new_gates:
            # tanh(g) * new_gate is the effective gate; keep it raw so the product is exact.
            gate = gate.tanh() * terms.new_gates[layer].float().reshape(())
        tensors[prefix + "adapter_gate"] = gate
    return tensors


def _linear_tensors(terms: _LayerTerms, config: LlamaAdapterV2Config, base_config: Any) -> dict[str, torch.Tensor]:
    """Biases (zeros where a layer has none), input-side scales (ones where none) and LoRA pairs, in HF order."""
    num_heads = base_config.num_attention_heads
    num_kv_heads = getattr(base_config, "num_key_value_heads", None) or num_heads
    tensors = {}
    for layer in range(base_config.num_hidden_layers):
        for short in config.bias_linears:
            bias = terms.biases.get((layer, short), torch.zeros(_out_features(base_config, short))).float()
            tensors[_linear_parameter(layer, short, config, "adapter_bias")] = _to_hf_rows(
                bias, short, num_heads, num_kv_heads
            )
        for short in config.scale_linears:
            # The scale multiplies the linear's input, which RoPE's row order does not touch.
            scale = terms.scales.get((layer, short), torch.ones(_in_features(base_config, short))).float()
            tensors[_linear_parameter(layer, short, config, "adapter_scale")] = scale
    for (layer, short, which), weight in terms.loras.items():
        path = f"model.layers.{layer}.{LINEAR_PATHS[short]}"
        if which == "1":
            tensors[f"{path}.lora_A.{LORA_ADAPTER_NAME}.weight"] = weight.float()
        else:
            tensors[f"{path}.lora_B.{LORA_ADAPTER_NAME}.weight"] = _to_hf_rows(
                weight.float(), short, num_heads, num_kv_heads
            )
    return tensors


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


def _in_features(base_config: Any, short: str) -> int:
    return base_config.intermediate_size if short == "down" else base_config.hidden_size


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
    """`mmadapter convert official-v2`: a released file (either layout) -> an mmadapter adapter folder."""
    state, file_config = read_official_v2(src)
    layout = official_v2_layout(state, str(src))
    base_config = read_base_config(base)
    config, tensors = convert_official_v2(
        state, file_config, base_config, clip_model=clip_model, clip_pretrained=clip_pretrained, source=str(src)
    )
    model = build_base_model(base_config, device="meta")
    attach_adapter(model, config)
    load_adapter_tensors(model, tensors, str(src))
    save_adapter(model, dst, prompt_template=LAYOUT_TEMPLATES[layout])
    if layout == "chat65b":
        return f"wrote {dst}: {_chat65b_summary(config, tensors)}"
    return f"wrote {dst}: {_multimodal_summary(config, tensors, clip_pretrained)}"


def _chat65b_summary(config: LlamaAdapterV2Config, tensors: dict[str, torch.Tensor]) -> str:
    norms = sum(name.endswith("norm.weight") for name in tensors)
    return (
        f"chat-65B bias/scale/norm adapter: bias on {','.join(config.bias_linears) or 'none'}; input-side scale on "
        f"{','.join(config.scale_linears) or 'none'}; {norms} RMSNorm weights; template chat65b"
    )


def _multimodal_summary(
    config: LlamaAdapterV2Config, tensors: dict[str, torch.Tensor], clip_pretrained: str | None
) -> str:
    gates = [t for name, t in tensors.items() if name.endswith("adapter_gate")]
    largest = max(t.abs().max().item() for t in gates)
    parts = [
        f"{len(gates)} layers x {config.prompt_length} prompts (from layer {config.first_adapted_layer})",
        f"bias on {','.join(config.bias_linears) or 'none'}",
        f"LoRA r={config.lora_rank}" if config.lora_rank else "no LoRA",
        f"largest |gate| {largest:.4f}" + ("" if config.gate_tanh else " (tanh(gate)·new_gate folded)"),
    ]
    note = "" if clip_pretrained else "; pass clip_pretrained= to load_adapter (CLIP weights are not in the file)"
    return f"{'; '.join(parts)}{note}"
