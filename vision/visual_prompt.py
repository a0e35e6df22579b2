"""Image → frozen CLIP → trainable projector → visual prompt: one object every caller asks, with one call.

LLaMA-Adapter V2 turns a picture into K prompt tokens in the language model's width. What that takes
besides the two networks is policy, and it lives here once instead of at every call site:
- the channel order: the released checkpoints were trained on BGR pixels presented as RGB (spec §3.8),
  so their images are swapped before CLIP, whether pixels come from a file, an upload or the cache;
- the text-only policy: a sample without an image sees the all-zero image (the released training) or
  no visual prompt at all;
- a V1 projector's single global token is repeated over the K prompt slots;
- the recent-image cache: chat clients send the conversation's picture again with every turn, so CLIP
  runs once per picture.

The encoder and projector stay registered on the language model under their own names (their
checkpoint keys are `visual_projector.*`); this object only refers to them.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from torch import nn

from mmadapter.core.examples import ImageBytes
from mmadapter.vision.clip_encoder import FrozenCLIPEncoder
from mmadapter.vision.feature_cache import CLIPFeatureCache, content_key
from mmadapter.vision.images import load_image, load_image_bytes, swap_red_blue, to_rgb

#: Visual prompts kept for the pictures seen last (serving asks from one generation thread).
RECENT_IMAGES = 8


@dataclasses.dataclass(eq=False)
class VisualPrompter:
    """The vision side of a multimodal adapter: what turns images (or cached CLIP features) into prompts."""

    encoder: FrozenCLIPEncoder
    projector: nn.Module
    channel_order: Literal["rgb", "bgr"] = "rgb"
    text_only_image: Literal["zeros", "none"] = "zeros"
    """What a sample without an image sees: the all-zero image, or no visual prompt (exact zeros)."""
    repeat_to: int | None = None
    """Repeat a one-token projection (V1 projector) over this many prompt slots."""
    recent: OrderedDict[str, torch.Tensor | None] = dataclasses.field(default_factory=OrderedDict, repr=False)

    @property
    def bgr(self) -> bool:
        return self.channel_order == "bgr"

    # ------------------------------------------------------------------ batches (training, scoring)

    def __call__(
        self,
        pixel_values: torch.Tensor | None = None,
        clip_features: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """The per-sample visual prompt (B, K, D) for forward/generate's `adapter_visual_prompt=`.

        Give preprocessed `pixel_values` (B, 3, H, W), or `clip_features` (B, T, C) from the frozen
        encoder (e.g. a feature cache) to skip CLIP. `image_mask` (B,) marks samples that really have
        an image; the others are text-only. With no image in the whole batch the result is None
        ('none') or a (1, K, D) prompt of the zero image ('zeros') that broadcasts over the batch.
        """
        zeros_for_text = self.text_only_image == "zeros"
        if pixel_values is None and clip_features is None:
            if not zeros_for_text:
                return None
            clip_features = self.encoder.zero_image_features()
        elif clip_features is None:
            if image_mask is not None and zeros_for_text:
                zero = torch.zeros((), dtype=pixel_values.dtype)
                pixel_values = torch.where(_mask(image_mask, pixel_values), pixel_values, zero)
            clip_features = self.encoder(pixel_values)  # frozen: runs without autograd
        elif image_mask is not None and zeros_for_text:
            zero = self.encoder.zero_image_features().to(clip_features.device, clip_features.dtype)
            clip_features = torch.where(_mask(image_mask, clip_features), clip_features, zero)
        parameter = next(self.projector.parameters())
        prompt = self.projector(clip_features.to(device=parameter.device, dtype=parameter.dtype))
        if self.repeat_to is not None:
            prompt = prompt.expand(-1, self.repeat_to, -1)
        if image_mask is not None and not zeros_for_text:
            zero = torch.zeros((), dtype=prompt.dtype, device=prompt.device)
            prompt = torch.where(_mask(image_mask, prompt), prompt, zero)
        return prompt

    # ------------------------------------------------------------------ single pictures (chat, serving)

    @torch.inference_mode()
    def for_image(self, image: Image.Image | None) -> torch.Tensor | None:
        """The visual prompt (1, K, D) of one picture, or of "no picture"; CLIP runs once per picture
        among the last `RECENT_IMAGES` asked for. Whoever changes the projector's weights calls `forget`."""
        key = "text-only" if image is None else content_key(image)
        if key not in self.recent:
            self.recent[key] = self() if image is None else self(self.pixels(image).unsqueeze(0))
            if len(self.recent) > RECENT_IMAGES:
                self.recent.popitem(last=False)
        self.recent.move_to_end(key)
        return self.recent[key]

    def forget(self) -> None:
        """Drop the remembered prompts (they belong to the projector weights they were computed with)."""
        self.recent.clear()

    def pixels(self, image: Image.Image, train: bool = False) -> torch.Tensor:
        """CLIP pixels (3, H, W) of an RGB-able picture, in the channel order the projector was trained on."""
        image = to_rgb(image)
        if self.bgr:
            image = swap_red_blue(image)
        return self.encoder.transform(train=train)(image)

    # ------------------------------------------------------------------ image files (training data)

    def pixel_loader(self, train: bool = True) -> Callable[[Path | ImageBytes], dict[str, torch.Tensor]]:
        """image file (or image inside a shard) -> {"pixel_values": (3, H, W)} with the training (random
        resized crop) or eval transform; errors name the file."""
        transform = self.encoder.transform(train=train)

        def load(image: Path | ImageBytes) -> dict[str, torch.Tensor]:
            if isinstance(image, ImageBytes):
                picture = load_image_bytes(image.data, source=image.name, bgr_quirk=self.bgr)
            else:
                picture = load_image(image, bgr_quirk=self.bgr)
            return {"pixel_values": transform(picture)}

        return load

    def feature_cache(self, directory: str | Path) -> CLIPFeatureCache:
        """The on-disk cache of this encoder's token features (for this channel order) under `directory`."""
        return CLIPFeatureCache(directory, self.encoder, bgr_quirk=self.bgr)


def _mask(image_mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) image mask -> a boolean tensor that broadcasts over `like`'s trailing dimensions."""
    return image_mask.to(device=like.device, dtype=torch.bool).view(-1, *([1] * (like.ndim - 1)))
