"""The one image → visual prompt object: channel order, text-only policy and the recent-picture cache."""

from __future__ import annotations

import torch
from PIL import Image

from mmadapter.vision import VisualProjectorV1, VisualProjectorV2, VisualPrompter


def _prompter(tiny_clip, **options) -> VisualPrompter:
    encoder = tiny_clip()
    torch.manual_seed(0)
    projector = VisualProjectorV2(encoder.output_dim, 48, width=32, query_len=4, depth=1, num_heads=2)
    return VisualPrompter(encoder, projector, **options)


def test_bgr_checkpoints_see_red_where_rgb_ones_see_blue(tiny_clip):
    """The released checkpoints were trained on BGR pixels read as RGB: a red picture must reach CLIP as blue."""
    red, blue = Image.new("RGB", (40, 30), (255, 0, 0)), Image.new("RGB", (40, 30), (0, 0, 255))
    bgr, rgb = _prompter(tiny_clip, channel_order="bgr"), _prompter(tiny_clip, channel_order="rgb")
    assert torch.equal(bgr.pixels(red), rgb.pixels(blue))
    assert torch.equal(bgr.for_image(red), rgb.for_image(blue))
    assert not torch.equal(rgb.for_image(red), rgb.for_image(blue))


def test_text_only_policy(tiny_clip):
    zeros = _prompter(tiny_clip, text_only_image="zeros")
    black = Image.new("RGB", (32, 32), (0, 0, 0))
    expected = zeros.projector(zeros.encoder.zero_image_features())  # the all-zero image, not a black picture
    assert torch.equal(zeros.for_image(None), expected.detach())
    assert not torch.equal(zeros.for_image(None), zeros.for_image(black))
    assert _prompter(tiny_clip, text_only_image="none").for_image(None) is None

    # A batch mixing pictures and text: text rows get the zero image's prompt, or exact zeros with "none".
    pixels = torch.stack([zeros.pixels(black), zeros.pixels(black)])
    mask = torch.tensor([True, False])
    mixed = zeros(pixels, image_mask=mask)
    assert torch.equal(mixed[1], expected[0].detach())
    nothing = _prompter(tiny_clip, text_only_image="none")(pixels, image_mask=mask)
    assert torch.equal(nothing[1], torch.zeros_like(nothing[1])) and nothing[0].abs().sum() > 0


def test_one_token_projection_repeats_over_the_prompt_slots(tiny_clip):
    encoder = tiny_clip()
    prompter = VisualPrompter(encoder, VisualProjectorV1(encoder.output_dim, 48), repeat_to=5)
    prompt = prompter.for_image(Image.new("RGB", (32, 32), (10, 200, 30)))
    assert prompt.shape == (1, 5, 48) and torch.equal(prompt[:, 0], prompt[:, 4])


def test_clip_runs_once_per_recent_picture_until_forgotten(tiny_clip):
    prompter = _prompter(tiny_clip)
    calls = []
    hook = prompter.encoder.register_forward_hook(lambda *_: calls.append(1))
    red = Image.new("RGB", (40, 30), "red")
    first = prompter.for_image(red)
    assert torch.equal(prompter.for_image(red.copy()), first) and len(calls) == 1
    with torch.no_grad():
        next(prompter.projector.parameters()).add_(1.0)
    assert torch.equal(prompter.for_image(red), first)  # remembered: the caller must say the weights changed
    prompter.forget()
    assert not torch.equal(prompter.for_image(red), first) and len(calls) == 2
    hook.remove()
