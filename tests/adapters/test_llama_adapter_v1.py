"""LLaMA-Adapter V1: exact zero-init, an independent reference forward, caching, training, checkpoints."""

from __future__ import annotations

import pytest
import torch

from mmadapter.adapters import (
    adapter_state_dict,
    attach_adapter,
    load_adapter,
    make_config,
    mark_trainable,
    optimizer_param_groups,
    save_adapter,
    trainable_parameters,
)
from tests.helpers.llama_reference import hf_llama_logits
from tests.helpers.perturb import perturb_adapter
from tests.helpers.tiny_llama import IDS, left_padded


def attach_v1(model, layers=2, length=3, gate_tanh=True):
    return attach_adapter(
        model, make_config("llama-adapter-v1", adapted_layers=layers, prompt_length=length, gate_tanh=gate_tanh)
    )


def greedy_without_cache(model, ids, mask, steps):
    """Recompute the whole sequence every step: the cache-free ground truth."""
    for _ in range(steps):
        logits = model(ids, attention_mask=mask, use_cache=False).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("gqa", [False, True])
def test_zero_init_gives_base_logits_and_generations_exactly(tiny_llama, attn, gqa):
    model = tiny_llama(gqa=gqa, attn=attn)
    ids, mask = left_padded()
    with torch.no_grad():
        base_logits = model(ids, attention_mask=mask).logits
        base_tokens = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    attach_v1(model, layers=3)
    assert model.config._attn_implementation == f"mmadapter_{attn}"
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, base_logits)
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(tokens, base_tokens)


def test_zero_init_exact_in_bfloat16(tiny_llama):
    model = tiny_llama(dtype=torch.bfloat16)
    ids, mask = left_padded()
    with torch.no_grad():
        base = model(ids, attention_mask=mask).logits
        attach_v1(model)
        adapted = model(ids, attention_mask=mask).logits
    assert adapted.dtype == torch.bfloat16
    assert torch.equal(adapted, base)
    assert all(p.dtype == torch.float32 for p in trainable_parameters(model).values())


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cached_generation_equals_uncached_with_open_gates(tiny_llama, attn):
    model = tiny_llama(gqa=True, attn=attn)
    attach_v1(model, layers=3)
    perturb_adapter(model)
    ids, mask = left_padded()
    with torch.no_grad():
        expected = greedy_without_cache(model, ids, mask, steps=6)
        cached = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(cached, expected)


def test_open_gates_change_the_output(tiny_llama):
    model = tiny_llama()
    with torch.no_grad():
        base = model(IDS).logits
    attach_v1(model)
    perturb_adapter(model)
    with torch.no_grad():
        assert (model(IDS).logits - base).abs().max() > 1e-3


@pytest.mark.parametrize("gqa", [False, True])
@pytest.mark.parametrize("gate_tanh", [True, False])
def test_adapter_forward_matches_reference(tiny_llama, gqa, gate_tanh):
    model = tiny_llama(gqa=gqa, attn="eager")
    attach_v1(model, layers=2, length=4, gate_tanh=gate_tanh)
    perturb_adapter(model)
    layers = model.model.layers
    prompts = {i: layers[i].self_attn.adapter_prompt.detach() for i in (2, 3)}
    gates = {i: layers[i].self_attn.adapter_gate.detach() for i in (2, 3)}
    with torch.no_grad():
        expected = hf_llama_logits(model, IDS, prompts=prompts, gates=gates, gate_tanh=gate_tanh)
        actual = model(IDS).logits
    assert (prompts[2] != 0).any() and (gates[2] != 0).any()
    torch.testing.assert_close(actual.double(), expected, atol=1e-4, rtol=1e-4)  # float32 vs the float64 reference


def test_prompt_keys_values_are_computed_once_per_generation(tiny_llama):
    model = tiny_llama()
    attach_v1(model, layers=1)
    calls = []
    model.model.layers[3].self_attn.k_proj.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[1]))
    with torch.no_grad():
        model.generate(IDS[:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
    prompt_calls = [length for length in calls if length == 3]
    assert len(prompt_calls) == 1, calls  # the prompt (length 3) went through k_proj once, not per token


# --- what trains -------------------------------------------------------------------------------


def test_only_adapter_parameters_change_after_training_steps(tiny_llama):
    model = tiny_llama(gqa=True)
    attach_v1(model, layers=2)
    selected = mark_trainable(model)
    assert set(selected) == {f"model.layers.{i}.self_attn.adapter_{p}" for i in (2, 3) for p in ("prompt", "gate")}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, weight_decay=0.02), lr=1e-2)
    model.train()
    for _ in range(3):
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(selected)


def test_weight_decay_groups_follow_the_official_rule(tiny_llama):
    model = attach_v1(tiny_llama())
    decay, no_decay = optimizer_param_groups(model, weight_decay=0.02)
    assert all(p.ndim == 2 for p in decay["params"]) and len(decay["params"]) == 2  # prompts
    assert all(p.ndim == 1 for p in no_decay["params"]) and len(no_decay["params"]) == 2  # gates
    assert no_decay["weight_decay"] == 0.0


# --- checkpoints -------------------------------------------------------------------------------


def test_save_load_round_trip_and_saves_only_the_adapter(tiny_llama, tmp_path):
    model = attach_v1(tiny_llama(gqa=True))
    perturb_adapter(model)
    save_adapter(model, tmp_path / "adapter", prompt_template="alpaca")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert set(saved) == set(adapter_state_dict(model))
    restored = load_adapter(tiny_llama(gqa=True), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(restored(IDS).logits, model(IDS).logits)


def test_loading_onto_another_base_names_the_dimension(tiny_llama, tmp_path):
    save_adapter(attach_v1(tiny_llama(gqa=True)), tmp_path / "adapter")
    with pytest.raises(ValueError, match="num_key_value_heads: adapter expects 2, base has 4"):
        load_adapter(tiny_llama(gqa=False), tmp_path / "adapter")
    # A field the other base's config does not set (Qwen3 sets head_dim, Qwen2 derives it): said so, not "None".
    from mmadapter.adapters.backbones.presets import base_config, build_base_model

    qwen3 = build_base_model(base_config("tiny-qwen3"))
    attach_adapter(qwen3, make_config("llama-adapter-v1", adapted_layers=2, prompt_length=2))
    save_adapter(qwen3, tmp_path / "qwen3")
    with pytest.raises(ValueError, match=r"head_dim: adapter expects \d+, base has none set"):
        load_adapter(build_base_model(base_config("tiny-qwen2")), tmp_path / "qwen3")


def test_config_rejects_unknown_and_invalid_fields():
    with pytest.raises(ValueError, match="unknown llama-adapter-v1 config field"):
        make_config("llama-adapter-v1", prompt_len=3)
    with pytest.raises(ValueError, match="prompt_length must be at least 1"):
        make_config("llama-adapter-v1", prompt_length=0)


def test_too_many_adapted_layers_is_a_clear_error(tiny_llama):
    with pytest.raises(ValueError, match="adapted_layers=30 but the base model has only 4 layers"):
        attach_adapter(tiny_llama(), make_config("llama-adapter-v1"))
