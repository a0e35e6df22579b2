"""CLIP preprocessing comes from the model's own config (size, mean/std, interpolation)."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from mmadapter.vision import FrozenCLIPEncoder, clip_transform


def _manual_eval(image: Image.Image, size: int, mean, std, resample) -> torch.Tensor:
    """Resize the shortest side to `size`, center crop, scale to [0, 1], normalise: written out plainly."""
    width, height = image.size
    scale = size / min(width, height)
    resized = image.resize(
        (int(width * scale) if width > height else size, int(height * scale) if height > width else size), resample
    )
    left, top = round((resized.width - size) / 2), round((resized.height - size) / 2)
    array = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    normalised = (array - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(normalised).permute(2, 0, 1)


def _noise_image(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_eval_transform_matches_a_plain_computation(tiny_clip):
    encoder = tiny_clip()
    cfg = encoder.preprocess_cfg
    assert cfg["mean"] == (0.48145466, 0.4578275, 0.40821073) and cfg["std"] == (0.26862954, 0.26130258, 0.27577711)
    for size in [(64, 48), (30, 50)]:
        image = _noise_image(*size)
        expected = _manual_eval(image, 32, cfg["mean"], cfg["std"], Image.Resampling.BICUBIC)
        torch.testing.assert_close(encoder.transform()(image), expected, rtol=0, atol=1e-6)


def test_model_specific_preprocessing_from_its_folder(tiny_clip, tmp_path):
    folder = tiny_clip().save(tmp_path / "clip")
    document = json.loads((folder / "open_clip_config.json").read_text())
    document["preprocess_cfg"].update(mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3], interpolation="bilinear")
    (folder / "open_clip_config.json").write_text(json.dumps(document))
    encoder = FrozenCLIPEncoder(pretrained=folder)
    image = _noise_image(40, 36)
    expected = _manual_eval(image, 32, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), Image.Resampling.BILINEAR)
    torch.testing.assert_close(encoder.transform()(image), expected, rtol=0, atol=1e-6)


def test_train_transform_is_the_official_random_resized_crop(tiny_clip):
    encoder = tiny_clip()
    transform = encoder.transform(train=True)
    crop = next(step for step in transform.transforms if isinstance(step, RandomResizedCrop))
    assert crop.scale == (0.9, 1.0) and crop.ratio == (0.75, 4 / 3) and crop.size == (32, 32)
    assert crop.interpolation.value == "bicubic"
    # A uniform image stays uniform under any crop, so the output is exactly the model's normalisation.
    pixels = transform(Image.new("RGB", (50, 40), (51, 102, 204)))
    mean, std = torch.tensor(encoder.preprocess_cfg["mean"]), torch.tensor(encoder.preprocess_cfg["std"])
    expected = ((torch.tensor([51, 102, 204]) / 255.0 - mean) / std).view(3, 1, 1).expand(3, 32, 32)
    torch.testing.assert_close(pixels, expected, rtol=0, atol=1e-5)


def test_clip_transform_ignores_unknown_fields():
    transform = clip_transform({"size": 8, "mean": (0.0,) * 3, "std": (1.0,) * 3, "note": "extra"})
    assert transform(Image.new("RGB", (16, 12), (255, 0, 0))).shape == (3, 8, 8)
