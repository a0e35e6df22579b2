"""LLaMA-Adapter V2: exact zero-init with an image, a plain reference forward, stages, text-only samples."""

from __future__ import annotations

import copy

import pytest
import torch

from mmadapter.adapters import attach_adapter, make_config, mark_trainable, trainable_parameters
from mmadapter.adapters.methods.llama_adapter_v2 import STAGES, parameter_group, visual_prompt
from tests.helpers.llama_reference import clip_tokens, hf_llama_logits, official_projector
from tests.helpers.llama_v2_setup import ALL_LINEARS, EVERYTHING, pixels, reference_terms, tiny_v2_config
from tests.helpers.perturb import perturb_adapter
from tests.helpers.tiny_llama import left_padded


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("scale_side", ["input", "output"])
def test_zero_init_with_an_image_gives_base_logits_exactly(tiny_llama, attn, scale_side):
    model = tiny_llama(attn=attn)
    ids, mask = left_padded()
    with torch.no_grad():
        base = model(ids, attention_mask=mask).logits
    attach_adapter(model, tiny_v2_config(**EVERYTHING, scale_side=scale_side))
    with torch.no_grad():
        prompt = visual_prompt(model, pixels())
        assert prompt.shape == (2, 3, 64) and prompt.abs().sum() > 0
        logits = model(ids, attention_mask=mask, adapter_visual_prompt=prompt).logits
    assert torch.equal(logits, base)


def test_zero_init_exact_in_bfloat16_including_generate(tiny_llama):
    model = tiny_llama(dtype=torch.bfloat16)
    ids, mask = left_padded()
    generate = {"attention_mask": mask, "max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        base = model(ids, attention_mask=mask).logits
        base_tokens = model.generate(ids, **generate)
        attach_adapter(model, tiny_v2_config(**EVERYTHING))
        prompt = visual_prompt(model, pixels())
        assert model.vision_encoder.dtype == torch.bfloat16
        assert torch.equal(model(ids, attention_mask=mask, adapter_visual_prompt=prompt).logits, base)
        assert torch.equal(model.generate(ids, adapter_visual_prompt=prompt, **generate), base_tokens)


@pytest.mark.parametrize(
    ("gqa", "scale_side", "fusion", "attn"),
    [(False, "input", "all", "sdpa"), (True, "output", "first", "eager")],
)
def test_forward_matches_a_plain_reference(tiny_llama, gqa, scale_side, fusion, attn):
    model = tiny_llama(gqa=gqa, attn=attn)
    config = tiny_v2_config(**EVERYTHING, scale_side=scale_side, visual_fusion=fusion, first_adapted_layer=1)
    attach_adapter(model, config)
    perturb_adapter(model)
    ids, mask = left_padded()
    images = pixels()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        prompt = visual_prompt(model, images)
        logits = model(ids, attention_mask=mask, position_ids=positions, adapter_visual_prompt=prompt).logits

    features = clip_tokens(copy.deepcopy(model.vision_encoder.visual).double(), images)
    reference_prompt = official_projector(model.visual_projector.state_dict(), features, num_heads=4)
    torch.testing.assert_close(prompt.double(), reference_prompt, atol=1e-5, rtol=1e-5)
    layers = model.model.layers
    # The reference reads the head counts from the config: check they are the ones this case is about.
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, 2 if gqa else 4)
    reference = hf_llama_logits(
        model,
        ids,
        terms=reference_terms(model, scale_side),
        prompts={n: layers[n].self_attn.adapter_prompt.detach() for n in range(1, 4)},
        gates={n: layers[n].self_attn.adapter_gate.detach() for n in range(1, 4)},
        visual=reference_prompt,
        fused_layers={1, 2, 3} if fusion == "all" else {1},
        attention_mask=mask,
    )
    real = mask.bool()
    # float32 model vs float64 reference: differences are float32 rounding.
    torch.testing.assert_close(logits[real].double(), reference[real], atol=2e-4, rtol=1e-4)
    assert (logits[real].double() - reference[real]).abs().max() > 0  # compared, not trivially equal


EXPECTED_GROUPS = {
    "multimodal-7b": {
        "caption": {"projector", "fused_prompts", "fused_gates"},
        "instruction": {"bias", "norms"},
    },
    "paper": {
        "caption": {"projector", "fused_prompts", "fused_gates"},
        "instruction": {"unfused_prompts", "unfused_gates", "bias", "scale", "norms"},
    },
}


@pytest.mark.parametrize("preset", sorted(EXPECTED_GROUPS))
def test_each_stage_gets_gradients_only_for_its_parameters(tiny_llama, preset):
    model = tiny_llama()
    config = tiny_v2_config(preset)
    attach_adapter(model, config)
    perturb_adapter(model)  # non-zero gates, so gradients reach prompts and projector
    ids, mask = left_padded()
    for stage in STAGES:
        selected = mark_trainable(model, stage)
        model.train()
        model.zero_grad(set_to_none=True)
        prompt = visual_prompt(model, pixels())
        model(ids, attention_mask=mask, adapter_visual_prompt=prompt, labels=ids).loss.backward()
        with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
        assert with_grad == set(selected), stage
        assert all(p.grad.abs().sum() > 0 for p in selected.values()), stage
        assert {parameter_group(name, config) for name in selected} == EXPECTED_GROUPS[preset][stage]
        encoder = model.vision_encoder
        assert not encoder.training and not any(p.requires_grad or p.grad is not None for p in encoder.parameters())
    assert set(trainable_parameters(model, None)) == set(trainable_parameters(model, "caption")) | set(
        trainable_parameters(model, "instruction")
    )


def test_mixed_batches_update_each_stage_only_from_its_own_data(tiny_llama):
    """The training loop's recipe: one union-trainable model, backward(inputs=stage parameters) per data type."""
    model = tiny_llama()
    attach_adapter(model, tiny_v2_config("paper"))
    perturb_adapter(model)
    mark_trainable(model, None)
    caption = trainable_parameters(model, "caption")
    instruction = trainable_parameters(model, "instruction")
    assert not set(caption) & set(instruction)
    ids, mask = left_padded()

    def caption_loss():
        return model(ids, attention_mask=mask, adapter_visual_prompt=visual_prompt(model, pixels()), labels=ids).loss

    def instruction_loss():  # text only: no visual prompt under the paper preset
        assert visual_prompt(model, image_mask=torch.tensor([False, False])) is None
        return model(ids.flip(0), attention_mask=mask.flip(0), labels=ids.flip(0)).loss

    alone_caption = torch.autograd.grad(caption_loss(), list(caption.values()))
    alone_instruction = torch.autograd.grad(instruction_loss(), list(instruction.values()))
    model.zero_grad(set_to_none=True)
    caption_loss().backward(inputs=list(caption.values()))
    instruction_loss().backward(inputs=list(instruction.values()))
    for param, expected in zip(caption.values(), alone_caption, strict=True):
        torch.testing.assert_close(param.grad, expected, rtol=0, atol=0)
    for param, expected in zip(instruction.values(), alone_instruction, strict=True):
        torch.testing.assert_close(param.grad, expected, rtol=0, atol=0)


def test_text_only_samples_without_visual_prompt(tiny_llama):
    model = tiny_llama()
    attach_adapter(model, tiny_v2_config(text_only_image="none"))
    perturb_adapter(model)
    ids, mask = left_padded()
    with torch.no_grad():
        assert visual_prompt(model) is None
        prompt = visual_prompt(model, pixels(), image_mask=torch.tensor([True, False]))
        assert torch.equal(prompt[1], torch.zeros_like(prompt[1]))
        assert torch.equal(prompt[0], visual_prompt(model, pixels())[0])
        mixed = model(ids, attention_mask=mask, adapter_visual_prompt=prompt).logits
        text_only = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(mixed[1], text_only[1], rtol=0, atol=1e-6)
    assert not torch.allclose(mixed[0], text_only[0], atol=1e-3)


def test_text_only_samples_see_the_zero_image_as_released(tiny_llama):
    model = tiny_llama()
    attach_adapter(model, tiny_v2_config())  # defaults: text_only_image="zeros"
    perturb_adapter(model)
    images = pixels()
    with torch.no_grad():
        zero_image = visual_prompt(model, torch.zeros(1, 3, 32, 32))
        assert torch.equal(visual_prompt(model), zero_image)  # no image at all: (1, K, D), broadcasts
        prompt = visual_prompt(model, images, image_mask=torch.tensor([True, False]))
        torch.testing.assert_close(prompt[1], zero_image[0], rtol=0, atol=1e-6)
        from_features = visual_prompt(
            model, clip_features=model.vision_encoder(images), image_mask=torch.tensor([True, False])
        )
    torch.testing.assert_close(from_features, prompt, rtol=0, atol=1e-6)


def test_v1_multimodal_projector_adds_one_global_token_to_every_prompt(tiny_llama):
    model = tiny_llama()
    attach_adapter(model, tiny_v2_config("v1-multimodal", first_adapted_layer=2))
    with torch.no_grad():
        prompt = visual_prompt(model, pixels())
    assert prompt.shape == (2, 3, 64)
    assert torch.equal(prompt[:, 0], prompt[:, 2])
    assert {parameter_group(n, model.adapter_config) for n in trainable_parameters(model, "caption")} == {"projector"}
    layers = model.model.layers
    assert [hasattr(layer.self_attn, "adapter_prompt") for layer in layers] == [False, False, True, True]


def test_config_is_checked_and_round_trips():
    config = tiny_v2_config("paper")
    assert type(config).from_dict(config.to_dict()) == config
    assert config.bias_linears == tuple(ALL_LINEARS)
    with pytest.raises(ValueError, match="must be a list"):
        make_config("llama-adapter-v2", bias_linears="q")
    with pytest.raises(ValueError, match="unknown entries"):
        make_config("llama-adapter-v2", caption_trains=["projector", "everything"])
    with pytest.raises(ValueError, match="scale would never train"):
        make_config("llama-adapter-v2", scale_linears=["q"])
    with pytest.raises(ValueError, match="visual_fusion"):
        make_config("llama-adapter-v2", visual_fusion="middle")
    with pytest.raises(ValueError, match="unknown stage"):
        config.stage_groups("pretrain")


def test_attach_rejects_a_first_layer_beyond_the_model(tiny_llama):
    with pytest.raises(ValueError, match="first_adapted_layer=4"):
        attach_adapter(tiny_llama(), tiny_v2_config(first_adapted_layer=4))
