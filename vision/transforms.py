"""CLIP preprocessing from a model's own `preprocess_cfg` (open_clip's transforms, not re-written).

Spec: `specs/llama-adapter.md` §3.8. Inference: resize the shortest side (bicubic), center crop,
normalise with the model's mean/std — what `clip.load` returns for ViT-L/14. Training (official
`transform_train`): RandomResizedCrop(scale (0.9, 1.0), ratio (3/4, 4/3), bicubic), which is exactly
open_clip's default training transform, so both come from `open_clip.transform.image_transform_v2`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from open_clip.transform import AugmentationCfg, PreprocessCfg, image_transform_v2
from PIL import Image

#: Official V2 training crop: scale (0.9, 1.0); the aspect ratio range is torchvision's default (3/4, 4/3).
TRAIN_CROP_SCALE = (0.9, 1.0)


def clip_transform(preprocess_cfg: Mapping[str, Any], train: bool = False) -> Callable[[Image.Image], torch.Tensor]:
    """PIL RGB image -> normalised (3, H, W) float tensor, per the model's size/mean/std/interpolation."""
    known = PreprocessCfg.__dataclass_fields__
    cfg = PreprocessCfg(**{key: value for key, value in preprocess_cfg.items() if key in known})
    return image_transform_v2(cfg, is_train=train, aug_cfg=AugmentationCfg(scale=TRAIN_CROP_SCALE))
