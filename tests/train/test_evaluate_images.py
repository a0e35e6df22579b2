"""`mmadapter eval --generate` on image samples: each answer is generated with its own image's visual prompt."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

from mmadapter.adapters import attach_adapter
from mmadapter.adapters.methods.llama_adapter_v2 import visual_prompter_of
from mmadapter.train.evaluate import generation_scores
from mmadapter.train.recipe import DataSource
from tests.helpers.llama_v2_setup import tiny_v2_config
from tests.helpers.perturb import perturb_adapter
from tests.helpers.tiny_llama import build_tiny_llama


def noisy_picture(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8))


def test_generated_answers_see_each_sample_s_own_image(make_recipe, tiny_tokenizer, tmp_path):
    model = attach_adapter(build_tiny_llama(), tiny_v2_config()).eval()
    perturb_adapter(model)
    for seed in (1, 2):
        noisy_picture(seed).save(tmp_path / f"{seed}.png")
    rows = [{"image": f"{seed}.png", "caption": "a picture"} for seed in (1, 2, 1)]
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    sources = [DataSource(format="caption-jsonl", path=str(tmp_path / "captions.jsonl"), images=str(tmp_path))]
    seen = []
    generate = model.generate

    def recording_generate(*args, **kwargs):
        seen.append(kwargs.get("adapter_visual_prompt"))
        return generate(*args, **kwargs)

    model.generate = recording_generate
    data = make_recipe().stages[0].data
    result = generation_scores(model, tiny_tokenizer, sources, data, max_new_tokens=2, greedy=True)

    # By hand: each picture through CLIP's eval transform (not the training crop), then the projector.
    prompter = visual_prompter_of(model)
    transform = prompter.encoder.transform(train=False)
    expected = [
        prompter(pixel_values=transform(Image.open(tmp_path / row["image"]).convert("RGB"))[None]) for row in rows
    ]
    assert result["generated"] == 3 and len(seen) == 3
    assert all(torch.equal(got, want) for got, want in zip(seen, expected, strict=True))
    assert not torch.allclose(expected[0], expected[1])  # the two pictures give different prompts

    # A picture whose header reads but whose pixels do not decode is left out; the others are still scored.
    (tmp_path / "cut.png").write_bytes((tmp_path / "1.png").read_bytes()[:60])
    rows.append({"image": "cut.png", "caption": "a picture"})
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = generation_scores(model, tiny_tokenizer, sources, data, max_new_tokens=2, greedy=True)
    assert result["generated"] == 3 and result["unreadable_images"] == 1
