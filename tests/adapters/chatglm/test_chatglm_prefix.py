"""The P-Tuning v2 hook of the ChatGLM-6B model (`transformer.prefix_encoder`), against hand-concatenated
prefix keys/values in the plain reference (no rotary on them, visible to all queries, positions unshifted)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmadapter.adapters.backbones.chatglm import glm_position_ids
from tests.helpers.chatglm_reference import GMASK, PAD, SOP, batch_mask_and_positions, reference_logits

ROWS = [[5, 11, 12, 13, GMASK, SOP, 21, 22], [5, 31, GMASK, SOP, 41]]
LAYERS, HEADS, HEAD_DIM, PREFIX = 3, 4, 16, 5
TOLERANCE = 2e-5


class StandInPrefix(nn.Module):
    """The interface the ptuning-v2 method implements: `(batch_size, dtype) -> [L, 2, b, heads, P, d]`."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(0.5 * torch.randn(LAYERS, 2, HEADS, PREFIX, HEAD_DIM))
        self.calls = 0

    def forward(self, batch_size: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        self.calls += 1
        prefix = self.table[:, :, None].expand(-1, -1, batch_size, -1, -1, -1)
        return prefix if dtype is None else prefix.to(dtype)


def with_prefix(model):
    torch.manual_seed(1)
    model.transformer.prefix_encoder = StandInPrefix()
    return model.transformer.prefix_encoder


def padded_batch(rows):
    ids, blocked, positions = batch_mask_and_positions(rows, PAD)
    return torch.tensor(ids), blocked, positions


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_prefix_forward_equals_hand_concatenated_reference(tiny_glm, attn):
    model = tiny_glm(attn=attn)
    encoder = with_prefix(model)
    ids, blocked, positions = padded_batch(ROWS)
    real = ids != PAD
    prefix = encoder.table.detach()[:, :, None].expand(-1, -1, len(ROWS), -1, -1, -1)
    expected = reference_logits(model.state_dict(), LAYERS, HEADS, ids, blocked, positions, prefix=prefix)
    logits = model(ids, attention_mask=real.long()).logits
    torch.testing.assert_close(logits[real], expected[real], atol=TOLERANCE, rtol=0)
    # The prefix really takes part: without it the logits differ.
    model.transformer.prefix_encoder = None
    assert (model(ids, attention_mask=real.long()).logits[real] - expected[real]).abs().max() > 1e-2


def test_prefix_is_cached_once_and_incremental_decoding_matches(tiny_glm):
    model = tiny_glm()
    encoder = with_prefix(model)
    ids = torch.tensor([ROWS[0]])
    full = model(ids).logits
    prompt = ROWS[0].index(SOP) + 1
    out = model(ids[:, :prompt], use_cache=True)
    assert out.past_key_values.get_seq_length() == PREFIX + prompt
    positions = glm_position_ids(ids, bos_token_id=SOP, gmask_token_id=GMASK, mask_token_id=130000)
    steps = [out.logits]
    for t in range(prompt, ids.shape[1]):
        out = model(ids[:, t : t + 1], position_ids=positions[..., t : t + 1], past_key_values=out.past_key_values)
        steps.append(out.logits)
    assert encoder.calls == 2  # the full forward and the first cached step; decode steps reuse the cache
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=TOLERANCE, rtol=0)


def test_generate_with_prefix_equals_greedy_full_forwards(tiny_glm):
    model = tiny_glm(attn="sdpa")
    with_prefix(model)
    prompts = [[5, 11, 12, GMASK, SOP], [5, GMASK, SOP]]
    ids = torch.tensor([[PAD] * (5 - len(p)) + p for p in prompts])
    padding = (ids != PAD).long()
    generated = model.generate(ids, attention_mask=padding, max_new_tokens=5, do_sample=False, eos_token_id=None)
    expected = ids
    for _ in range(5):
        mask = torch.cat([padding, torch.ones(2, expected.shape[1] - ids.shape[1], dtype=torch.long)], dim=1)
        next_token = model(expected, attention_mask=mask, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        expected = torch.cat([expected, next_token], dim=1)
    assert torch.equal(generated, expected)


@pytest.mark.parametrize("reentrant", [False, True])
def test_prefix_trains_alone_and_gradient_checkpointing_keeps_its_gradient(tiny_glm, reentrant):
    model = tiny_glm()
    encoder = with_prefix(model)
    ids = torch.tensor([ROWS[0]])
    labels = torch.tensor([[-100] * 5 + ROWS[0][5:]])
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": reentrant})
        model.train()
        encoder.table.grad = None
        model(ids, labels=labels).loss.backward()
        grads.append(encoder.table.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0])
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("transformer.prefix_encoder"))


def test_prefix_with_the_wrong_shape_is_refused(tiny_glm):
    model = tiny_glm()
    model.transformer.prefix_encoder = lambda batch_size, dtype=None: torch.zeros(LAYERS, 2, batch_size, HEADS, 2, 8)
    with pytest.raises(ValueError, match=r"expected \(layers, 2, batch, heads, pre_seq_len, head_dim\)"):
        model(torch.tensor([ROWS[1]]))


def test_the_ptuning_v2_method_plugs_into_the_hook(tiny_glm):
    """Integration with the ptuning-v2 method: its encoder's keys/values enter exactly like the stand-in's."""
    from mmadapter.adapters import attach_adapter, make_config

    model = tiny_glm()
    attach_adapter(model, make_config("ptuning-v2", pre_seq_len=PREFIX))
    encoder = model.transformer.prefix_encoder
    with torch.no_grad():
        encoder.embedding.weight.normal_(0, 0.5)
    ids, blocked, positions = padded_batch(ROWS)
    real = ids != PAD
    expected = reference_logits(
        model.state_dict(), LAYERS, HEADS, ids, blocked, positions, prefix=encoder(len(ROWS)).detach()
    )
    logits = model(ids, attention_mask=real.long()).logits
    torch.testing.assert_close(logits[real], expected[real], atol=TOLERANCE, rtol=0)
