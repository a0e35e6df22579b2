"""Bias and scale terms on frozen linear layers, and folding them into the weights for serving.

LLaMA-Adapter V2 (Gao et al., 2023, arXiv:2304.15010, §4.2 "bias tuning of linear layers") gives
every linear layer of a block a zero-initialised bias b and a one-initialised scale s. The
official code places the scale on different sides (spec llama-adapter.md §4, §6):

    input side  (released chat-65B code):  y = W (s ⊙ x) + b0 + b      s has in_features entries
    output side (paper, eq. 1):            y = s ⊙ (W x + b0 + b)      s has out_features entries

and the released multimodal-7B model has biases only. The new parameters live on the `nn.Linear`
itself as `adapter_bias` / `adapter_scale` (so `q_proj.weight` keeps its name and base checkpoints
still load), with one typed `BiasScaleState` beside them, and act through forward hooks (ecosystem-notes §1.4). At init the hooks multiply by
exactly 1 and add exactly 0, which IEEE arithmetic leaves bit-identical in every dtype.

When peft wraps the linear for LoRA, the terms stay on the inner `base_layer`: LoRA then sees the
unscaled input, as in the official LORA-BIAS model (which has no scale: y = W x + b + B A x).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from mmadapter.adapters.backbones.quantization import is_quantized_linear
from mmadapter.adapters.methods.strength import current_strength

#: Short names used in configs -> module path inside a LLaMA decoder layer.
LINEAR_PATHS: dict[str, str] = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
SCALE_SIDES = ("input", "output")
STATE_ATTRIBUTE = "adapter_bias_scale"


@dataclasses.dataclass(eq=False)
class BiasScaleState:
    """What a linear with bias/scale terms (or a merged LoRA update) knows besides its parameters."""

    scale_side: str = "input"
    """"input" (y = W (s ⊙ x) + b) or "output" (y = s ⊙ (W x + b))."""
    merged: bool = False
    """Folded into the weight and bias: the hooks then do nothing."""
    originals: dict[str, torch.Tensor | None] | None = None
    """The weight (CPU copy, when merging changed it) and bias before merging, for an exact unmerge."""


def bias_scale_state(linear: nn.Module) -> BiasScaleState | None:
    """The bias/scale state of a (frozen) linear, or None where no terms are attached."""
    return getattr(linear, STATE_ATTRIBUTE, None)


def frozen_linear(module: nn.Module) -> nn.Linear:
    """The plain `nn.Linear` holding the frozen weight (inside a peft LoRA layer if there is one)."""
    return getattr(module, "base_layer", module)


def add_bias_scale(linear: nn.Linear, *, bias: bool, scale: bool, scale_side: str = "input") -> None:
    """Give `linear` a zero bias and/or a one scale (float32 master weights) and the hooks applying them."""
    if scale_side not in SCALE_SIDES:
        raise ValueError(f"scale_side must be one of {SCALE_SIDES}, got {scale_side!r}")
    device = linear.weight.device
    if bias:
        linear.adapter_bias = nn.Parameter(torch.zeros(linear.out_features, device=device))
    if scale:
        size = linear.in_features if scale_side == "input" else linear.out_features
        linear.adapter_scale = nn.Parameter(torch.ones(size, device=device))
    setattr(linear, STATE_ATTRIBUTE, BiasScaleState(scale_side))
    if scale and scale_side == "input":
        linear.register_forward_pre_hook(_scale_input)
    if bias or (scale and scale_side == "output"):
        linear.register_forward_hook(_add_output_terms)


def _scale_input(linear: nn.Linear, args: tuple) -> tuple | None:
    if bias_scale_state(linear).merged:
        return None
    x = args[0]
    return (x * _scale_at_strength(linear.adapter_scale).to(x.dtype), *args[1:])


def _scale_at_strength(scale: torch.Tensor) -> torch.Tensor:
    """s at the current strength r: 1 + r (s - 1) (exactly 1 at r = 0, s itself at r = 1)."""
    value = current_strength()
    return scale if value == 1.0 else 1.0 + value * (scale.float() - 1.0)


def _add_output_terms(linear: nn.Linear, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
    state = bias_scale_state(linear)
    if state.merged:
        return None
    bias = getattr(linear, "adapter_bias", None)
    value = current_strength()
    if bias is not None:
        output = output + (bias if value == 1.0 else value * bias.float()).to(output.dtype)
    if state.scale_side == "output" and getattr(linear, "adapter_scale", None) is not None:
        output = output * _scale_at_strength(linear.adapter_scale).to(output.dtype)
    return output


def merge_linear(module: nn.Module, *, merge_lora: bool = True, keep_originals: bool = True) -> None:
    """Fold bias/scale (and, if asked, peft's LoRA update) into the frozen weight and bias.

    Input side: W' = W·diag(s); output side: W' = diag(s)·W and b' = s ⊙ (b0 + b); a Linear
    without a bias gets one. With `keep_originals` the untouched weight is copied to CPU memory
    (only when the weight changes) so `unmerge_linear` restores it bit for bit.
    """
    linear = frozen_linear(module)
    state = bias_scale_state(linear)
    if (state is not None and state.merged) or is_quantized_linear(linear):
        return  # a quantized weight is packed: its hooks (and peft's LoRA branch) keep applying the terms
    scale = getattr(linear, "adapter_scale", None)
    bias = getattr(linear, "adapter_bias", None)
    lora = merge_lora and module is not linear
    originals: dict[str, torch.Tensor | None] = {"bias": None if linear.bias is None else linear.bias.detach().clone()}
    if keep_originals and (scale is not None or lora):
        originals["weight"] = linear.weight.detach().to("cpu", copy=True)
    with torch.no_grad():
        weight = linear.weight
        new_bias = None if linear.bias is None else linear.bias.float()
        if bias is not None:
            new_bias = bias.float() if new_bias is None else new_bias + bias.float()
        if scale is not None:
            if state.scale_side == "input":
                weight.copy_((weight.float() * scale.float()).to(weight.dtype))
            else:
                weight.copy_((weight.float() * scale.float()[:, None]).to(weight.dtype))
                new_bias = None if new_bias is None else new_bias * scale.float()
        if new_bias is not None:
            if linear.bias is None:
                linear.bias = nn.Parameter(new_bias.to(weight.dtype), requires_grad=False)
            else:
                linear.bias.copy_(new_bias.to(linear.bias.dtype))
    if state is None:  # LoRA alone on this linear: the state records the merge for unmerge_linear
        state = BiasScaleState()
        setattr(linear, STATE_ATTRIBUTE, state)
    state.originals = originals if keep_originals else None
    state.merged = True
    if lora:
        module.merge()


def unmerge_linear(module: nn.Module) -> None:
    """Undo `merge_linear` exactly: original weight and bias back, hooks active again."""
    linear = frozen_linear(module)
    state = bias_scale_state(linear)
    if state is None or not state.merged:
        return
    originals = state.originals
    if originals is None:
        raise ValueError("this model was merged with keep_originals=False; reload the base model to unmerge")
    if module is not linear and module.merged:
        module.unmerge()  # resets peft's bookkeeping; the weight is then restored exactly below
    with torch.no_grad():
        if "weight" in originals:
            linear.weight.copy_(originals["weight"])
        if originals["bias"] is None:
            linear.bias = None
        else:
            linear.bias.copy_(originals["bias"])
    state.originals = None
    state.merged = False
