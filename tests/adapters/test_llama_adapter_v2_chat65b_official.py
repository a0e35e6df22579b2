"""Import of the released LLaMA-Adapter V2 chat-65B file (bias/scale/norm, no prompts), against the official math.

The official model (`llama_adapter_v2_chat65b/llama/model.py`) computes every one of the seven linears as
y = W(x·s) + b (`forward_linear_with_scale_and_bias`), uses its own RMSNorm weights, and its file is
`{"model": {...}}` with bare Meta names (`layers.N.attention.wq_bias`, `…wq_scale`, `…attention_norm.weight`,
`norm.weight`). `official_logits` below is that forward on Meta-layout tensors (interleaved complex RoPE),
written out here in fp32; the imported adapter runs on a transformers LlamaForCausalLM.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from mmadapter.adapters import load_adapter
from mmadapter.adapters.io import official_v2
from mmadapter.adapters.io.official_v2 import load_official_v2
from mmadapter.adapters.methods.base import adapter_config_of, make_config
from mmadapter.cli.main import main
from tests.helpers.tiny_llama import IDS, build_tiny_llama

#: Official module of each linear, and its transformers path.
GROUPS = {"wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention"}
HF_PATHS = {
    "wq": "self_attn.q_proj",
    "wk": "self_attn.k_proj",
    "wv": "self_attn.v_proj",
    "wo": "self_attn.o_proj",
    "w1": "mlp.gate_proj",
    "w3": "mlp.up_proj",
    "w2": "mlp.down_proj",
}
TOLERANCE = 1e-5  # fp32 against fp32; logits are O(1)


def meta_rows(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """HF -> Meta order of q/k output rows: HF row r·(d/2) + i of a head is Meta row 2i + r."""
    d = rows.shape[0] // heads
    return rows.reshape(heads, 2, d // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def meta_base(model) -> dict[str, torch.Tensor]:
    """The tiny model's frozen weights under the official names, q/k rows in Meta order."""
    heads = model.config.num_attention_heads
    base = {"tok_embeddings.weight": model.model.embed_tokens.weight, "output.weight": model.lm_head.weight}
    for n, layer in enumerate(model.model.layers):
        for name, path in HF_PATHS.items():
            weight = layer.get_submodule(path).weight
            base[f"layers.{n}.{GROUPS.get(name, 'feed_forward')}.{name}.weight"] = (
                meta_rows(weight, heads) if name in ("wq", "wk") else weight
            )
    return {key: value.detach().clone() for key, value in base.items()}


def official_file(model, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random values for every key the chat-65B model saves, at the tiny model's shapes."""
    config = model.config
    dim, ffn = config.hidden_size, config.intermediate_size
    sizes = {"wq": (dim, dim), "wk": (dim, dim), "wv": (dim, dim), "wo": (dim, dim)}  # (bias, scale)
    sizes |= {"w1": (ffn, dim), "w3": (ffn, dim), "w2": (dim, ffn)}
    state = {"norm.weight": 1 + 0.2 * torch.randn(dim, generator=generator)}
    for n in range(config.num_hidden_layers):
        for name, (out_size, in_size) in sizes.items():
            key = f"layers.{n}.{GROUPS.get(name, 'feed_forward')}.{name}"
            # q/k biases large enough that the attention pattern, and so the logits, depend on their row order.
            std = 2.0 if name in ("wq", "wk") else 0.2
            state[key + "_bias"] = std * torch.randn(out_size, generator=generator)
            state[key + "_scale"] = 1 + 0.3 * torch.randn(in_size, generator=generator)
        for norm in ("attention_norm", "ffn_norm"):
            state[f"layers.{n}.{norm}.weight"] = 1 + 0.2 * torch.randn(dim, generator=generator)
    return state


def official_logits(base, adapter, ids: torch.Tensor, heads: int, eps: float, theta: float) -> torch.Tensor:
    """`Transformer.forward_inference` of the chat-65B code: RMSNorm in fp32, every linear W(x·s) + b."""

    def rms_norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    def linear(x, n, name):
        key = f"layers.{n}.{GROUPS.get(name, 'feed_forward')}.{name}"
        return F.linear(x * adapter[key + "_scale"], base[key + ".weight"]) + adapter[key + "_bias"]

    batch, length = ids.shape
    dim = base["tok_embeddings.weight"].shape[1]
    d = dim // heads
    freqs = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    rotation = torch.polar(torch.ones(length, d // 2), torch.outer(torch.arange(length).float(), freqs))

    def rotate(x):  # interleaved pairs (2i, 2i+1) as complex numbers, as `apply_rotary_emb`
        pairs = torch.view_as_complex(x.reshape(batch, length, heads, d // 2, 2))
        return torch.view_as_real(pairs * rotation[None, :, None, :]).reshape(batch, length, heads, d)

    causal = torch.full((length, length), float("-inf")).triu(1)
    h = base["tok_embeddings.weight"][ids]
    layers = 1 + max(int(key.split(".")[1]) for key in adapter if key.startswith("layers."))
    for n in range(layers):
        x = rms_norm(h, adapter[f"layers.{n}.attention_norm.weight"])
        q, k, v = (linear(x, n, name).view(batch, length, heads, d) for name in ("wq", "wk", "wv"))
        q, k = rotate(q), rotate(k)
        scores = torch.einsum("bshd,bthd->bhst", q, k) / math.sqrt(d) + causal
        attended = torch.einsum("bhst,bthd->bshd", scores.softmax(-1), v).reshape(batch, length, dim)
        h = h + linear(attended, n, "wo")
        x = rms_norm(h, adapter[f"layers.{n}.ffn_norm.weight"])
        h = h + linear(F.silu(linear(x, n, "w1")) * linear(x, n, "w3"), n, "w2")
    return rms_norm(h, adapter["norm.weight"]) @ base["output.weight"].T


@pytest.fixture
def chat65b_file(tmp_path):
    """(path of an official-layout chat-65B file for the tiny LLaMA, its tensors, the official logits)."""
    model = build_tiny_llama(attn="eager")
    state = official_file(model, torch.Generator().manual_seed(7))
    torch.save({"model": state}, tmp_path / "chat65b.pth")
    config = model.config
    theta = config.rope_parameters["rope_theta"]
    expected = official_logits(meta_base(model), state, IDS, config.num_attention_heads, config.rms_norm_eps, theta)
    return tmp_path / "chat65b.pth", expected


def imported_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def test_load_official_v2_reads_the_chat65b_layout_as_the_chat65b_preset(chat65b_file):
    path, expected = chat65b_file
    model = load_official_v2(build_tiny_llama(attn="eager"), path)
    assert adapter_config_of(model) == make_config("llama-adapter-v2", "chat65b")
    torch.testing.assert_close(imported_logits(model), expected, atol=TOLERANCE, rtol=0)


def test_q_and_k_biases_need_the_rotary_row_permutation(chat65b_file, monkeypatch):
    """Without Meta -> HF row order on wq_bias / wk_bias the comparison above fails."""
    path, expected = chat65b_file
    monkeypatch.setattr(official_v2, "permute_rotary_rows", lambda rows, heads: rows)
    logits = imported_logits(load_official_v2(build_tiny_llama(attn="eager"), path))
    assert (logits - expected).abs().max() > 100 * TOLERANCE


def test_convert_official_v2_detects_the_chat65b_layout(chat65b_file, tmp_path, capsys):
    path, expected = chat65b_file
    assert main(["convert", "official-v2", str(path), str(tmp_path / "out"), "--base", "tiny-llama"]) == 0
    message = capsys.readouterr().out
    assert "chat-65B bias/scale/norm adapter: bias on q,k,v,o,gate,up,down" in message
    assert "input-side scale on q,k,v,o,gate,up,down; 9 RMSNorm weights; template chat65b" in message
    saved = json.loads((tmp_path / "out" / "mmadapter_config.json").read_text())
    assert saved["prompt_template"] == "chat65b"
    model = load_adapter(build_tiny_llama(attn="eager"), tmp_path / "out")
    torch.testing.assert_close(imported_logits(model), expected, atol=TOLERANCE, rtol=0)


def test_a_file_of_neither_layout_is_refused_naming_both(tmp_path, capsys):
    torch.save({"model": {"layers.0.attention.wq.weight": torch.zeros(4, 4)}}, tmp_path / "bad.pth")
    assert main(["convert", "official-v2", str(tmp_path / "bad.pth"), str(tmp_path / "out"), "--base", "tiny-llama"])
    error = capsys.readouterr().err
    assert "no 'adapter_query.weight' (multimodal layout)" in error
    assert "no 'layers.N.attention.wq_bias' / '…_scale' keys (chat-65B layout)" in error


def test_a_chat65b_file_for_another_depth_names_the_base_it_needs(chat65b_file, tmp_path):
    path, _ = chat65b_file
    state = torch.load(path, weights_only=True)["model"]
    deeper = {**state, "layers.9.attention.wq_bias": state["layers.0.attention.wq_bias"]}
    torch.save({"model": deeper}, tmp_path / "deeper.pth")
    with pytest.raises(ValueError, match="a chat-65B file for 10 layers, the base has 4 .*base llama-65b"):
        load_official_v2(build_tiny_llama(attn="eager"), tmp_path / "deeper.pth")
