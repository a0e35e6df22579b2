"""The one plain LLaMA forward of the tests, float64, with the LLaMA-Adapter math written from the papers and
the official code (spec llama-adapter.md §1.3, §3.2-§3.4).

Nothing here imports mmadapter: the LLaMA forward, V1's gated prompts (their own softmax, no RoPE, tanh or raw
gates), V2's bias/scale/LoRA on the linears and visual prompt added to the prompts of fused layers, RoPE in
Meta's interleaved or HF's half-split layout, the official visual projector (clip_proj -> LN -> [query; tokens]
-> ViT blocks -> first K -> visual_proj -> LN) and CLIP's all-token features are spelled out with torch
primitives. `llama_logits` reads Meta-named tensors (official files); `hf_llama_logits` reads a transformers model.

The same forward covers the Llama-style families: Llama 3.1's RoPE frequency scaling (`llama3_inv_freq`),
Mistral's sliding window, Qwen2's q/k/v biases and Qwen3's per-head q/k norms and explicit head size. Prompt
keys and values go through the layer's key/value path without RoPE: biases and the key norm included.
"""

from __future__ import annotations

import math

import torch


def rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def layer_norm(x, weight, bias, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def rope(x, positions, theta, layout, inv_freq=None):
    """x (B, T, H, d); positions (B, T). 'interleaved' rotates pairs (2i, 2i+1), 'half' pairs (i, i+d/2).
    `inv_freq` (d/2,) replaces the plain frequencies theta^(-2i/d) (Llama 3.1's scaled ones)."""
    d = x.shape[-1]
    freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d) if inv_freq is None else inv_freq  # (d/2,)
    angle = positions[..., None].double() * freqs  # (B, T, d/2)
    cos, sin = angle.cos()[:, :, None, :], angle.sin()[:, :, None, :]
    if layout == "interleaved":
        a, b = x[..., 0::2], x[..., 1::2]
        out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)
        return out.flatten(-2)
    a, b = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


def llama3_inv_freq(head_dim, theta, factor, low_freq_factor, high_freq_factor, original_context):
    """Llama 3.1's RoPE frequencies: wavelengths shorter than original_context / high_freq_factor are kept, longer
    than original_context / low_freq_factor divided by `factor`, and those between blended linearly in
    original_context / wavelength: the `rope_scaling` of type llama3 in the Llama 3.1 config.json files."""
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelength = 2 * math.pi / freqs
    blend = (original_context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    scaled = (1 - blend) * freqs / factor + blend * freqs
    scaled = torch.where(wavelength < original_context / high_freq_factor, freqs, scaled)
    return torch.where(wavelength > original_context / low_freq_factor, freqs / factor, scaled)


class Terms:
    """Adapter terms by (layer, linear) with linear in wq wk wv wo w1 w2 w3."""

    def __init__(self, scale_side="input"):
        self.bias, self.scale, self.scale_side, self.lora = {}, {}, scale_side, {}

    def linear(self, x, weight, layer, name, with_lora=True, base_bias=None):
        """The linear's own bias `base_bias` (Qwen2's q/k/v) is added with the adapter's, inside an output scale."""
        scale = self.scale.get((layer, name))
        scale = None if scale is None else scale.double()
        bias = self.bias.get((layer, name))
        bias = None if bias is None else bias.double()
        x_in = x * scale if scale is not None and self.scale_side == "input" else x
        y = x_in @ weight.T
        if base_bias is not None:
            y = y + base_bias
        if bias is not None:
            y = y + bias
        if scale is not None and self.scale_side == "output":
            y = y * scale
        if with_lora and (layer, name) in self.lora:
            a, b = (t.double() for t in self.lora[(layer, name)])
            y = y + (x @ a.T) @ b.T
        return y


def _project(w, terms, x, layer, name, heads, head_dim, with_lora=True):
    """x through attention linear `name` of `layer` (with its own bias, if any), split into heads."""
    prefix = f"layers.{layer}.attention.{name}"
    y = terms.linear(x, w[prefix + ".weight"], layer, name, with_lora=with_lora, base_bias=w.get(prefix + ".bias"))
    return y.view(x.shape[0], x.shape[1], heads, head_dim)


def _head_norm(w, x, layer, name, eps):
    """Qwen3's per-head RMSNorm `name` (q_norm or k_norm) of `layer`, where the weights have one."""
    weight = w.get(f"layers.{layer}.attention.{name}.weight")
    return x if weight is None else rms_norm(x, weight, eps)


def llama_logits(
    w,
    tokens,
    *,
    n_heads,
    n_kv_heads=None,
    eps=1e-6,
    theta=10000.0,
    layout="half",
    terms=None,
    prompts=None,
    gates=None,
    gate_tanh=True,
    visual=None,
    fused_layers=(),
    attention_mask=None,
    head_dim=None,
    inv_freq=None,
    window=None,
):
    """Logits (B, T, V) in float64. `w` uses Meta key names: tok_embeddings.weight, layers.n.attention.wq.weight, …
    layers.n.feed_forward.w1/w2/w3, attention_norm, ffn_norm, norm, output (all plain tensors); optional
    layers.n.attention.wq/wk/wv.bias (Qwen2) and layers.n.attention.q_norm/k_norm.weight (Qwen3, per head).

    prompts/gates: {layer: (K, D)} / {layer: (H,)}; visual (B, K, D) is added to the prompts of
    `fused_layers`. attention_mask (B, T) of 0/1 for left padding: positions count real tokens.
    head_dim defaults to dim / n_heads; inv_freq replaces the RoPE frequencies; window (Mistral) lets a query
    see only the keys fewer than `window` places back.
    """
    w = {k: v.double() for k, v in w.items()}
    terms = terms or Terms()
    prompts, gates = prompts or {}, gates or {}
    n_kv_heads = n_kv_heads or n_heads
    batch, length = tokens.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(tokens)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    h = w["tok_embeddings.weight"][tokens]
    head_dim = head_dim or h.shape[-1] // n_heads
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    if window is not None:
        index = torch.arange(length)
        causal &= index[:, None] - index[None, :] < window
    # Queries see earlier real tokens; a padding query sees itself only, so nothing becomes NaN.
    allowed = (causal[None] & attention_mask.bool()[:, None, :]) | torch.eye(length, dtype=torch.bool)
    n_layers = 1 + max(int(k.split(".")[1]) for k in w if k.startswith("layers."))
    for n in range(n_layers):
        p = f"layers.{n}."
        x = rms_norm(h, w[p + "attention_norm.weight"], eps)
        q = _head_norm(w, _project(w, terms, x, n, "wq", n_heads, head_dim), n, "q_norm", eps)
        k = _head_norm(w, _project(w, terms, x, n, "wk", n_kv_heads, head_dim), n, "k_norm", eps)
        v = _project(w, terms, x, n, "wv", n_kv_heads, head_dim)
        q, k = rope(q, positions, theta, layout, inv_freq), rope(k, positions, theta, layout, inv_freq)
        group = n_heads // n_kv_heads
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
        if n in prompts:
            prompt = prompts[n].double()[None].expand(batch, -1, -1)
            if visual is not None and n in fused_layers:
                prompt = prompt + visual.double()
            # The key path of the tokens without RoPE: projection (and bias), then the per-head key norm if any.
            kp = _project(w, terms, prompt, n, "wk", n_kv_heads, head_dim, with_lora=False)
            kp = _head_norm(w, kp, n, "k_norm", eps)
            vp = _project(w, terms, prompt, n, "wv", n_kv_heads, head_dim, with_lora=False)
            kp, vp = kp.repeat_interleave(group, dim=2), vp.repeat_interleave(group, dim=2)
            prompt_scores = torch.einsum("bqhd,bkhd->bhqk", q, kp) / math.sqrt(head_dim)
            gate = gates[n].double()
            gate = gate.tanh() if gate_tanh else gate
            out = out + gate[None, None, :, None] * torch.einsum("bhqk,bkhd->bqhd", prompt_scores.softmax(-1), vp)
        h = h + terms.linear(out.reshape(batch, length, -1), w[p + "attention.wo.weight"], n, "wo")
        x = rms_norm(h, w[p + "ffn_norm.weight"], eps)
        gate_act = torch.nn.functional.silu(terms.linear(x, w[p + "feed_forward.w1.weight"], n, "w1"))
        up = terms.linear(x, w[p + "feed_forward.w3.weight"], n, "w3")
        h = h + terms.linear(gate_act * up, w[p + "feed_forward.w2.weight"], n, "w2")
    return rms_norm(h, w["norm.weight"], eps) @ w["output.weight"].T


def hf_to_reference_weights(model):
    """A HF LlamaForCausalLM's (or Mistral/Qwen2/Qwen3 model's) frozen weights under the reference's Meta-style
    names (HF row order), with the linears' own biases and the per-head q/k norms where the family has them."""
    names = {
        "self_attn.q_proj": "attention.wq",
        "self_attn.k_proj": "attention.wk",
        "self_attn.v_proj": "attention.wv",
        "self_attn.o_proj": "attention.wo",
        "mlp.gate_proj": "feed_forward.w1",
        "mlp.up_proj": "feed_forward.w3",
        "mlp.down_proj": "feed_forward.w2",
    }
    w = {
        "tok_embeddings.weight": model.model.embed_tokens.weight,
        "norm.weight": model.model.norm.weight,
        "output.weight": model.lm_head.weight,
    }
    for n, layer in enumerate(model.model.layers):
        w[f"layers.{n}.attention_norm.weight"] = layer.input_layernorm.weight
        w[f"layers.{n}.ffn_norm.weight"] = layer.post_attention_layernorm.weight
        for hf, meta in names.items():
            linear = getattr(layer.get_submodule(hf), "base_layer", layer.get_submodule(hf))
            w[f"layers.{n}.{meta}.weight"] = linear.weight
            if linear.bias is not None:
                w[f"layers.{n}.{meta}.bias"] = linear.bias
        for norm in ("q_norm", "k_norm"):
            if hasattr(layer.self_attn, norm):
                w[f"layers.{n}.attention.{norm}.weight"] = getattr(layer.self_attn, norm).weight
    return {k: v.detach() for k, v in w.items()}


def hf_rope_inv_freq(config):
    """The RoPE frequencies a transformers config asks for: None for plain RoPE, Llama 3.1's scaled ones."""
    rope = config.rope_parameters
    if rope["rope_type"] == "default":
        return None
    assert rope["rope_type"] == "llama3", f"the reference has no {rope['rope_type']} RoPE"
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return llama3_inv_freq(
        head_dim,
        rope["rope_theta"],
        rope["factor"],
        rope["low_freq_factor"],
        rope["high_freq_factor"],
        rope["original_max_position_embeddings"],
    )


def hf_llama_logits(model, tokens, **adapter):
    """`llama_logits` on a transformers LlamaForCausalLM (or Mistral/Qwen2/Qwen3 model): its frozen weights, and the
    shape, norm epsilon, RoPE and sliding window from its config (HF's half-split layout); `adapter` holds the
    adapter terms and the attention mask."""
    config = model.config
    return llama_logits(
        hf_to_reference_weights(model),
        tokens,
        n_heads=config.num_attention_heads,
        n_kv_heads=config.num_key_value_heads,
        eps=config.rms_norm_eps,
        theta=config.rope_parameters["rope_theta"],
        layout="half",
        head_dim=getattr(config, "head_dim", None),
        inv_freq=hf_rope_inv_freq(config),
        window=getattr(config, "sliding_window", None),
        **adapter,
    )


def clip_tokens(visual, pixels):
    """All CLIP tokens (class + patches) after ln_post and the output projection (spec §3.2)."""
    x = visual.conv1(pixels.double())  # (B, width, g, g)
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.double().expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.double()
    x = visual.ln_pre(x)
    for block in visual.transformer.resblocks:
        x = x + block.attn(*(block.ln_1(x),) * 3, need_weights=False)[0]
        x = x + block.mlp(block.ln_2(x))
    return visual.ln_post(x) @ visual.proj.double()


def official_projector(state, clip_features, num_heads):
    """The official visual path after CLIP (`forward_visual`), from official key names, float64."""
    s = {k: v.double() for k, v in state.items()}
    x = clip_features.double() @ s["clip_proj.weight"].T + s["clip_proj.bias"]
    x = layer_norm(x, s["clip_proj_norm.weight"], s["clip_proj_norm.bias"])
    query = s["visual_query.weight"]
    x = torch.cat([query[None].expand(x.shape[0], -1, -1), x], dim=1)
    depth = 1 + max(int(k.split(".")[1]) for k in s if k.startswith("visual_blocks."))
    for i in range(depth):
        p = f"visual_blocks.{i}."
        y = layer_norm(x, s[p + "norm1.weight"], s[p + "norm1.bias"])
        batch, length, width = y.shape
        qkv = (y @ s[p + "attn.qkv.weight"].T + s[p + "attn.qkv.bias"]).view(batch, length, 3, num_heads, -1)
        q, k, v = qkv.unbind(2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * (width // num_heads) ** -0.5
        attn = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(batch, length, width)
        x = x + attn @ s[p + "attn.proj.weight"].T + s[p + "attn.proj.bias"]
        y = layer_norm(x, s[p + "norm2.weight"], s[p + "norm2.bias"])
        y = torch.nn.functional.gelu(y @ s[p + "mlp.fc1.weight"].T + s[p + "mlp.fc1.bias"])
        x = x + y @ s[p + "mlp.fc2.weight"].T + s[p + "mlp.fc2.bias"]
    x = x[:, : query.shape[0]]
    x = x @ s["visual_proj.weight"].T + s["visual_proj.bias"]
    return layer_norm(x, s["visual_proj_norm.weight"], s["visual_proj_norm.bias"])
