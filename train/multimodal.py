"""Images into the training loop: per-sample image inputs, and the visual prompt of a batch.

An adapter with a visual projector (LLaMA-Adapter V2) takes images as a visual prompt passed to
the model's forward as `adapter_visual_prompt=` (adapters/methods/prompt_attention.py). Samples are loaded
as CLIP pixels with the official training transform (random resized crop), or, when
`data.clip_cache` is set, as cached frozen-CLIP token features (vision/feature_cache.py), which
skips CLIP entirely after the first epoch (at the cost of the random crop).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmadapter.adapters.methods.llama_adapter_v2 import takes_images, visual_prompter_of
from mmadapter.adapters.methods.prompt_attention import VISUAL_PROMPT_KWARG
from mmadapter.train.readers import BadSample


def model_inputs(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, images: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """Forward kwargs for a batch: ids and padding mask, plus the visual prompt when the adapter sees.

    Text-only samples of a multimodal adapter get what the adapter's `text_only_image` says
    (the released training shows them an all-zero image).
    """
    inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if takes_images(model):
        prompt = visual_prompter_of(model)(
            pixel_values=images.get("pixel_values"),
            clip_features=images.get("clip_features"),
            image_mask=images.get("image_mask"),
        )
        if prompt is not None:
            inputs[VISUAL_PROMPT_KWARG] = prompt
    return inputs


class CachedFeatureLoader:
    """path -> {"clip_features": (T, C)} from a warmed CLIP feature cache."""

    def __init__(self, cache, keys: dict[Path, str]) -> None:
        self.cache, self.keys = cache, keys

    def __call__(self, path: Path) -> dict[str, torch.Tensor]:
        return {"clip_features": self.cache.get(self.keys[path]).float()}


def warm_feature_cache(
    model: nn.Module, directory: str | Path, paths: list[Path], show_progress: bool
) -> tuple[CachedFeatureLoader, list[tuple[Path, str]]]:
    """Compute missing CLIP features for `paths`; returns the loader and (path, error) of unreadable images."""
    cache = visual_prompter_of(model).feature_cache(directory)
    unique = sorted(set(paths))
    result = cache.warm(unique, progress=show_progress, skip_errors=True)  # reads and hashes each file once
    keys = {path: key for path, key in zip(unique, result.keys, strict=True) if key is not None}
    failed = [(Path(error.source), str(error)) for error in result.failed]
    return CachedFeatureLoader(cache, keys), failed


def image_loader_for(model: nn.Module, clip_cache: str | None, samples: list, show_progress: bool, train: bool = True):
    """(image loader, bad samples whose image is unreadable) for `samples`; `train` picks the random crop."""
    if not takes_images(model):
        return None, []
    if clip_cache is None:
        return visual_prompter_of(model).pixel_loader(train), []
    paths = [s.image for s in samples if s.image is not None]
    loader, failed = warm_feature_cache(model, clip_cache, paths, show_progress)
    reasons = dict(failed)
    bad = [BadSample(s.source, reasons[s.image]) for s in samples if s.image in reasons]
    return loader, bad
