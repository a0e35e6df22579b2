"""Zero-initialised gated attention over learned prompts, inside transformers' attention call.

LLaMA-Adapter (Zhang et al., 2023, arXiv:2303.16199, §3.2) lets every token of an adapted layer
also attend to K learned prompt vectors P. Per head, with the layer's own (frozen) projections:

    O = softmax(Q Kt^T / sqrt(d) + mask) Vt  +  g * softmax(Q Kp^T / sqrt(d)) Vp,
    Kp = P Wk, Vp = P Wv   (no RoPE on prompt keys, no mask, a separate softmax)

and g = tanh(gate) starts at zero, so the adapted model starts as the base model exactly. Prompt
keys and values take the layer's own key/value path except RoPE: projection biases (Qwen2) and a
per-head key norm (Qwen3's `k_norm`, applied to every key before RoPE) included.

transformers 5 calls a registered attention function with the query *after* RoPE, so the prompt
branch is added there, before `o_proj`, without recomputing the query (DESIGN §3). Parameters
live on the attention module itself (`self_attn.adapter_prompt`, `self_attn.adapter_gate`), so
base checkpoints still load by their usual names; everything else the branch needs is one typed
`GatedPromptState` beside them (peft's layer classes keep their state the same way).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

from mmadapter.adapters.methods.routing import PROMPT_ROUTES_ATTRIBUTE, RowRouting, current_routing
from mmadapter.adapters.methods.strength import current_strength, strength

#: Keyword argument of the model's forward that carries per-sample visual prompts (B, K, D).
VISUAL_PROMPT_KWARG = "adapter_visual_prompt"
_PREFIX = "mmadapter_"
STATE_ATTRIBUTE = "adapter_prompt_state"
#: model_types whose prompt attention is tested against a plain reference forward (tests/adapters/test_families.py).
PROMPT_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
_PROJECTIONS = ("q_proj", "k_proj", "v_proj")


def _own_eager_kernel(module: nn.Module) -> Callable:
    """The eager kernel of the module's own modeling file (it may do more than Llama's, e.g. Gemma 2's logit
    soft-capping), so "eager" keeps the base model's arithmetic on every family; Llama's where the file has none."""
    return getattr(sys.modules[type(module).__module__], "eager_attention_forward", eager_attention_forward)


#: Kernel name -> the kernel an attention module runs under it: transformers' sdpa, or the model file's eager.
_KERNELS: dict[str, Callable[[nn.Module], Callable]] = {
    "sdpa": lambda module: sdpa_attention_forward,
    "eager": _own_eager_kernel,
}


@dataclasses.dataclass(frozen=True, eq=False)
class PromptKeyValues:
    """Prompt keys and values computed without autograd, valid while `signature` (the weights' identity and
    version, the dtype, whether a visual prompt was fused) and the visual prompt are unchanged."""

    signature: tuple
    visual_prompt: torch.Tensor | None
    keys: torch.Tensor
    values: torch.Tensor


@dataclasses.dataclass(eq=False)
class GatedPromptState:
    """What a prompt-adapted attention module knows besides its two parameters."""

    gate_tanh: bool
    """g = tanh(gate) (the paper, released V2) or the raw gate (the official V1 example.py)."""
    fuse_visual: bool
    """Whether this layer adds the visual prompt to its learned prompt."""
    cache: PromptKeyValues | None = None


def prompt_state(attention: nn.Module) -> GatedPromptState | None:
    """The attention module's prompt state, or None where no prompt is attached."""
    return getattr(attention, STATE_ATTRIBUTE, None)


def _decoder_attentions(model: nn.Module) -> list[nn.Module | None]:
    """Each decoder block's `self_attn` (None where a block has none); empty without transformers' `layers`."""
    layers = getattr(model.get_decoder(), "layers", None) or ()
    return [getattr(layer, "self_attn", None) for layer in layers]


def _support_problems(model: nn.Module) -> list[str]:
    """What `model` lacks for gated prompts inside its attention (empty: it can take them)."""
    problems = []
    attentions = _decoder_attentions(model)
    if not attentions or not all(a is not None and all(hasattr(a, p) for p in _PROJECTIONS) for a in attentions):
        problems.append("q_proj/k_proj/v_proj attention modules (`self_attn` in every block of `get_decoder().layers`)")
    elif any(_whole_projection_norm(attention) for attention in attentions):
        problems.append("a per-head k_norm (this model normalises the whole key projection)")
    if not getattr(model, "_supports_attention_backend", False):
        problems.append("transformers' attention-function registry")
    return problems


def _whole_projection_norm(attention: nn.Module) -> bool:
    norm = getattr(attention, "k_norm", None)
    return norm is not None and norm.weight.shape[-1] != attention.head_dim


def check_prompt_support(model: nn.Module, method: str) -> None:
    """Refuse, naming what is missing, a model whose attention cannot take LLaMA-Adapter prompts."""
    problems = _support_problems(model)
    if problems:
        raise ValueError(
            f"model_type {model.config.model_type!r}: {method} needs {' and '.join(problems)}; "
            f"supported: {', '.join(PROMPT_FAMILIES)}"
        )


def add_gated_prompt(
    attention: nn.Module, prompt_length: int, *, gate_tanh: bool = True, fuse_visual: bool = False
) -> None:
    """Give one attention module a learned prompt (K, D) ~ N(0, 1) and per-head gates at zero.

    Adapter parameters are float32 master weights whatever the base dtype (as the official code).
    """
    weight = attention.q_proj.weight
    hidden = attention.q_proj.in_features  # not weight.shape: a 4-bit weight is packed
    num_heads = attention.config.num_attention_heads
    attention.adapter_prompt = nn.Parameter(torch.randn(prompt_length, hidden, device=weight.device))
    attention.adapter_gate = nn.Parameter(torch.zeros(num_heads, device=weight.device))
    setattr(attention, STATE_ATTRIBUTE, GatedPromptState(gate_tanh=gate_tanh, fuse_visual=fuse_visual))


def _tensor_signature(tensors: list[torch.Tensor]) -> tuple:
    return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)


def prompt_key_values(
    attention: nn.Module, dtype: torch.dtype, visual_prompt: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt keys and values (b, kv_heads, K, d), b = 1 unless a visual prompt is fused.

    They depend only on weights (and the request's image), so without autograd they are computed
    once and reused for every generated token until a weight changes.
    """
    state = prompt_state(attention)
    fuse = visual_prompt is not None and state.fuse_visual
    grad = torch.is_grad_enabled()
    k_norm = getattr(attention, "k_norm", None)
    if not grad:
        weights = [attention.adapter_prompt, *attention.k_proj.parameters(), *attention.v_proj.parameters()]
        weights += [] if k_norm is None else list(k_norm.parameters())
        signature = (_tensor_signature(weights), dtype, fuse, current_strength())
        cached = state.cache
        if cached is not None and cached.signature == signature and (not fuse or cached.visual_prompt is visual_prompt):
            return cached.keys, cached.values
    prompt = attention.adapter_prompt
    prompt = prompt + visual_prompt.to(prompt.dtype) if fuse else prompt.unsqueeze(0)  # (b, K, D)
    prompt = prompt.to(dtype)
    batch, length, _ = prompt.shape
    head_dim = attention.head_dim
    # Through the frozen projections only: a peft LoRA wrapper's update does not apply to prompts (spec §3.3).
    k_proj, v_proj = (getattr(p, "base_layer", p) for p in (attention.k_proj, attention.v_proj))
    keys = k_proj(prompt).view(batch, length, -1, head_dim)
    if k_norm is not None:  # Qwen3: every key is normalised per head before RoPE, so the prompt keys are too
        keys = k_norm(keys)
    keys = keys.transpose(1, 2)
    values = v_proj(prompt).view(batch, length, -1, head_dim).transpose(1, 2)
    if not grad:
        state.cache = PromptKeyValues(signature, visual_prompt if fuse else None, keys, values)
    return keys, values


def gated_prompt_output(
    attention: nn.Module, query: torch.Tensor, visual_prompt: torch.Tensor | None = None
) -> torch.Tensor:
    """The gated prompt branch for a rotated query (B, H, T, d); returns (B, T, H, d)."""
    batch, num_heads, length, head_dim = query.shape
    keys, values = prompt_key_values(attention, query.dtype, visual_prompt)
    kv_heads = keys.shape[1]
    # Heads sharing one key/value head (GQA) are adjacent: fold them into the query length.
    grouped = query.reshape(batch, kv_heads, (num_heads // kv_heads) * length, head_dim)
    keys, values = keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1)  # views, no copies
    # No mask: every query sees all K prompt slots. The fused kernel accumulates the softmax in float32.
    output = F.scaled_dot_product_attention(grouped, keys, values, scale=attention.scaling)
    # reshape, not view: CUDA's fused kernels return (B, T, H, d) memory behind the (B, H, T, d) shape.
    output = output.reshape(batch, num_heads, length, head_dim)
    gate = attention.adapter_gate.tanh() if prompt_state(attention).gate_tanh else attention.adapter_gate
    value = current_strength()
    gate = gate if value == 1.0 else value * gate.float()  # a request's adapter_scale (routing)
    output = gate.to(query.dtype).view(1, num_heads, 1, 1) * output
    return output.transpose(1, 2)


def _routed_prompt_output(module: nn.Module, query: torch.Tensor, output: torch.Tensor, routing: RowRouting):
    """`output` plus each row group's prompt branch, from the prompts of the group's adapter (routing.py)."""
    routes = getattr(module, PROMPT_ROUTES_ATTRIBUTE, None) or {}
    for group in routing.groups:
        source = routes.get(group.adapter)
        if source is None:
            continue
        with strength(group.strength):
            if group.whole_batch:
                output = output + gated_prompt_output(source, query, group.visual_prompt)
            else:
                branch = gated_prompt_output(source, query[group.rows], group.visual_prompt)
                output = output.index_add(0, group.rows, branch)
    return output


def _with_prompt_branch(name: str) -> Callable:
    def attention_forward(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs,
    ):
        visual_prompt = kwargs.pop(VISUAL_PROMPT_KWARG, None)
        output, weights = _KERNELS[name](module)(module, query, key, value, attention_mask, **kwargs)
        routing = current_routing()
        if routing is not None:
            output = _routed_prompt_output(module, query, output, routing)
        elif getattr(module, "adapter_prompt", None) is not None:
            output = output + gated_prompt_output(module, query, visual_prompt)
        return output, weights

    return attention_forward


for _name in _KERNELS:
    ALL_ATTENTION_FUNCTIONS.register(_PREFIX + _name, _with_prompt_branch(_name))
    # Without a mask function under the same name transformers silently drops padding masks.
    ALL_MASK_ATTENTION_FUNCTIONS.register(_PREFIX + _name, ALL_MASK_ATTENTION_FUNCTIONS[_name])


def use_prompt_attention(model: nn.Module) -> None:
    """Switch the model to the prompt-aware version of its attention kernel (sdpa or eager)."""
    current = model.config._attn_implementation
    base = current.removeprefix(_PREFIX)
    if base not in _KERNELS:
        raise ValueError(f"LLaMA-Adapter prompts support attention kernels {sorted(_KERNELS)}, not {current!r}")
    if current != _PREFIX + base:
        model.set_attn_implementation(_PREFIX + base)
