"""LLaMA-Adapter V2 merge/unmerge: bias, scale (both sides) and LoRA folded into the weights for serving."""

from __future__ import annotations

import pytest
import torch

from mmadapter.adapters import attach_adapter, get_method, make_config
from mmadapter.adapters.methods.llama_adapter_v2 import visual_prompt
from tests.helpers.llama_v2_setup import EVERYTHING, pixels, tiny_v2_config
from tests.helpers.perturb import perturb_adapter
from tests.helpers.tiny_llama import left_padded


def snapshot(model):
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


@pytest.mark.parametrize("scale_side", ["input", "output"])
def test_merged_logits_match_and_unmerge_restores_weights_bit_for_bit(tiny_llama, scale_side):
    model = tiny_llama()
    config = tiny_v2_config(**EVERYTHING, scale_side=scale_side)
    attach_adapter(model, config)
    perturb_adapter(model)
    method = get_method(config.method)
    ids, mask = left_padded()
    before = snapshot(model)
    with torch.no_grad():
        prompt = visual_prompt(model, pixels())
        unmerged = model(ids, attention_mask=mask, adapter_visual_prompt=prompt).logits
        method.merge(model, config)
        merged = model(ids, attention_mask=mask, adapter_visual_prompt=prompt).logits
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.merged and q_proj.base_layer.bias is not None  # folded into a new Linear bias
    k_proj = model.model.layers[1].self_attn.k_proj
    assert not k_proj.merged  # LoRA on k/v of prompt layers stays apart: official prompts skip LoRA
    # Folding changes the float32 rounding order only.
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)

    method.unmerge(model, config)
    after = snapshot(model)
    assert after.keys() == before.keys()  # the biases created by merge are gone again
    assert all(torch.equal(after[name], before[name]) for name in before)
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask, adapter_visual_prompt=prompt).logits, unmerged)


def test_merge_without_originals_cannot_unmerge(tiny_llama):
    model = tiny_llama()
    config = tiny_v2_config(bias_linears=["q"], scale_linears=["q"], instruction_trains=["bias", "scale", "norms"])
    attach_adapter(model, config)
    perturb_adapter(model)
    method = get_method(config.method)
    ids, mask = left_padded()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        method.merge(model, config, keep_originals=False)
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="keep_originals=False"):
        method.unmerge(model, config)


def test_merged_chat65b_generation_equals_unmerged(tiny_llama):
    model = tiny_llama()
    config = make_config("llama-adapter-v2", "chat65b")
    attach_adapter(model, config)
    perturb_adapter(model)
    assert not any(hasattr(layer.self_attn, "adapter_prompt") for layer in model.model.layers)
    ids, mask = left_padded()
    generate = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        expected = model.generate(ids, **generate)
        get_method(config.method).merge(model, config)
        assert torch.equal(model.generate(ids, **generate), expected)
