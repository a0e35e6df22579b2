"""ChatGLM-6B forward, cache, padding, dtypes and generate() against the plain reference in tests.helpers."""

from __future__ import annotations

import pytest
import torch

from mmadapter.adapters.backbones.chatglm import glm_blocked_mask, glm_position_ids
from mmadapter.adapters.backbones.presets import base_config, build_base_model
from tests.helpers.chatglm_reference import (
    EOP,
    GMASK,
    MASK,
    PAD,
    SOP,
    batch_mask_and_positions,
    official_mask_and_positions,
    reference_logits,
)

IDS = {"bos_token_id": SOP, "gmask_token_id": GMASK, "mask_token_id": MASK}
# Two prompts (ending [gMASK] <sop>) followed by a few answer tokens.
ROWS = [[5, 11, 12, 13, 14, GMASK, SOP, 21, 22, 23], [5, 31, 32, GMASK, SOP, 41, 42]]
FP32_TOLERANCE = 2e-5  # logits are O(5); fp32 re-implementations agree to rounding


def reference(model, rows, **kwargs):
    ids, blocked, positions = batch_mask_and_positions(rows, PAD)
    logits = reference_logits(model.state_dict(), 3, 4, torch.tensor(ids), blocked, positions, **kwargs)
    return torch.tensor(ids), logits


def test_preset_has_the_released_keys_shapes_and_parameter_count():
    model = build_base_model(base_config("chatglm-6b"), device="meta")
    per_layer = {
        "input_layernorm.weight": (4096,),
        "input_layernorm.bias": (4096,),
        "attention.query_key_value.weight": (12288, 4096),
        "attention.query_key_value.bias": (12288,),
        "attention.dense.weight": (4096, 4096),
        "attention.dense.bias": (4096,),
        "post_attention_layernorm.weight": (4096,),
        "post_attention_layernorm.bias": (4096,),
        "mlp.dense_h_to_4h.weight": (16384, 4096),
        "mlp.dense_h_to_4h.bias": (16384,),
        "mlp.dense_4h_to_h.weight": (4096, 16384),
        "mlp.dense_4h_to_h.bias": (4096,),
    }
    expected = {f"transformer.layers.{i}.{k}": v for i in range(28) for k, v in per_layer.items()}
    expected |= {
        "transformer.word_embeddings.weight": (130528, 4096),
        "transformer.final_layernorm.weight": (4096,),
        "transformer.final_layernorm.bias": (4096,),
        "lm_head.weight": (130528, 4096),
    }
    # The release has 368 keys: these 340 plus 28 ignored rotary_emb.inv_freq buffers (spec §3).
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    assert model.lm_head.weight is model.transformer.word_embeddings.weight
    # Spec §3: 534.6 M embedding + 28 × 201.38 M + final LayerNorm, head tied.
    assert sum(p.numel() for p in model.parameters()) == 6_173_286_400


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_logits_equal_the_reference_forward(tiny_glm, attn):
    model = tiny_glm(attn=attn)
    assert model.config._attn_implementation == attn
    for row in ROWS:  # unpadded rows, masks and positions built inside the model
        expected = reference(model, [row])[1]
        logits = model(torch.tensor([row])).logits
        torch.testing.assert_close(logits, expected, atol=FP32_TOLERANCE, rtol=0)


def test_mask_and_positions_match_the_official_construction():
    ids, blocked, positions = batch_mask_and_positions(ROWS, PAD)
    ids = torch.tensor(ids)
    padding = (ids != PAD).long()
    assert torch.equal(glm_position_ids(ids, padding, **IDS), positions)
    # Pad query rows are fully blocked in the official tokenizer path, real rows see only real columns.
    assert torch.equal(glm_blocked_mask(ids, padding, bos_token_id=SOP), blocked)
    # Spec §2.7 worked example: "你好" -> [5, 74874, 130001, 130004].
    example_blocked, example_positions = official_mask_and_positions([5, 74874, GMASK, SOP])
    assert example_positions.tolist() == [[0, 1, 2, 2], [0, 0, 0, 1]]
    assert torch.equal(glm_position_ids(torch.tensor([[5, 74874, GMASK, SOP]]), **IDS)[0], example_positions)
    assert example_blocked[:3, 3].all() and not example_blocked[3].any()


def test_official_4d_mask_and_positions_are_accepted(tiny_glm):
    model = tiny_glm()
    ids, blocked, positions = batch_mask_and_positions(ROWS, PAD)
    ids = torch.tensor(ids)
    from_tokenizer_style = model(ids, attention_mask=blocked, position_ids=positions).logits
    from_padding_mask = model(ids, attention_mask=(ids != PAD).long()).logits
    torch.testing.assert_close(from_tokenizer_style, from_padding_mask, atol=1e-6, rtol=0)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_left_padded_batch_equals_single_rows_and_reference(tiny_glm, attn):
    model = tiny_glm(attn=attn)
    ids, expected = reference(model, ROWS)
    real = ids != PAD
    batched = model(ids, attention_mask=real.long()).logits
    torch.testing.assert_close(batched[real], expected[real], atol=FP32_TOLERANCE, rtol=0)
    for i, row in enumerate(ROWS):
        single = model(torch.tensor([row])).logits[0]
        torch.testing.assert_close(batched[i][real[i]], single, atol=FP32_TOLERANCE, rtol=0)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_incremental_decoding_with_the_cache_equals_the_full_forward(tiny_glm, attn):
    model = tiny_glm(attn=attn)
    ids = torch.tensor([[PAD, PAD, PAD] + ROWS[1], ROWS[0]])
    padding = (ids != PAD).long()
    full = model(ids, attention_mask=padding).logits
    prompt = 7  # through <sop> in both rows
    out = model(ids[:, :prompt], attention_mask=padding[:, :prompt], use_cache=True)
    cache = out.past_key_values
    steps = [out.logits]
    positions = glm_position_ids(ids, padding, **IDS)
    for t in range(prompt, ids.shape[1]):
        out = model(
            ids[:, t : t + 1],
            attention_mask=padding[:, : t + 1],
            position_ids=positions[..., t : t + 1],
            past_key_values=cache,
            use_cache=True,
        )
        steps.append(out.logits)
    assert cache.get_seq_length() == ids.shape[1]
    real = padding.bool()
    torch.testing.assert_close(torch.cat(steps, dim=1)[real], full[real], atol=FP32_TOLERANCE, rtol=0)


def test_decoding_with_the_cache_needs_positions(tiny_glm):
    model = tiny_glm()
    cache = model(torch.tensor([ROWS[1]]), use_cache=True).past_key_values
    with pytest.raises(ValueError, match="position_ids are required"):
        model(torch.tensor([[7]]), past_key_values=cache)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float16, 0.05), (torch.bfloat16, 0.3)])
def test_half_precision_logits_stay_close_to_fp32(tiny_glm, dtype, tolerance):
    """Logits are O(6); fp16 keeps ~3 significant digits, bf16 ~2 (tolerances stated as absolute)."""
    model = tiny_glm(dtype=dtype)
    ids, expected = reference(tiny_glm(), ROWS)
    real = ids != PAD
    logits = model(ids, attention_mask=real.long()).logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    torch.testing.assert_close(logits.float()[real], expected[real], atol=tolerance, rtol=0)


def test_loss_is_the_shifted_cross_entropy_ignoring_minus_100(tiny_glm):
    model = tiny_glm()
    row = ROWS[0] + [EOP]
    labels = [-100] * row.index(SOP) + row[row.index(SOP) :]
    out = model(torch.tensor([row]), labels=torch.tensor([labels]))
    logits = out.logits[0, :-1]
    targets = torch.tensor(labels[1:])
    keep = targets != -100
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(out.loss, expected)


def greedy_without_cache(model, ids, padding, steps):
    """Hand-written greedy decoding: a full forward over the whole sequence at every step."""
    for _ in range(steps):
        logits = model(ids, attention_mask=padding, use_cache=False).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        padding = torch.cat([padding, torch.ones_like(padding[:, :1])], dim=1)
    return ids


def test_generate_with_cache_equals_greedy_full_forwards_on_a_left_padded_batch(tiny_glm):
    model = tiny_glm(attn="sdpa")
    prompts = [[5, 11, 12, 13, GMASK, SOP], [5, 31, GMASK, SOP]]
    ids = torch.tensor([[PAD] * (6 - len(p)) + p for p in prompts])
    padding = (ids != PAD).long()
    generated = model.generate(ids, attention_mask=padding, max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert torch.equal(generated, greedy_without_cache(model, ids, padding, 6))


def test_generate_stops_at_eop(tiny_glm):
    model = tiny_glm()
    with torch.no_grad():  # make <eop> the best next token after a couple of answer tokens
        final = model.transformer.final_layernorm
        final.weight.zero_()
        final.bias.copy_(torch.linspace(-1, 1, final.bias.numel()))
        model.transformer.word_embeddings.weight[EOP] = 50 * final.bias
    prompt = torch.tensor([[5, 11, 12, GMASK, SOP]])
    generated = model.generate(prompt, max_new_tokens=10, do_sample=False)
    assert generated[0, prompt.shape[1] :].tolist() == [EOP]


def test_gradient_checkpointing_gives_the_same_gradients(tiny_glm):
    model = tiny_glm()
    ids = torch.tensor([ROWS[0]])
    weight = model.transformer.layers[0].attention.query_key_value.weight
    weight.requires_grad_(True)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.activation_checkpointing_enable()
        model.train()
        weight.grad = None
        model(ids, labels=ids).loss.backward()
        grads.append(weight.grad.clone())
    assert model.transformer.layers[0].gradient_checkpointing
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.gpu
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_fp16_on_cuda_matches_the_fp32_reference(tiny_glm, attn):
    model = tiny_glm(attn=attn)
    ids, expected = reference(model, ROWS)
    real = ids != PAD
    model.to("cuda", torch.float16)
    logits = model(ids.cuda(), attention_mask=real.long().cuda()).logits.float().cpu()
    torch.testing.assert_close(logits[real], expected[real], atol=0.05, rtol=0)
    generated = model.generate(ids.cuda(), attention_mask=real.long().cuda(), max_new_tokens=4, do_sample=False)
    assert generated.shape == (len(ROWS), ids.shape[1] + 4)
