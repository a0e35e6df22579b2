"""The vision side of mmadapter: frozen open_clip vision towers (CLIP or SigLIP), image loading and
preprocessing, the trainable projectors that turn their tokens into visual prompt tokens, and the feature cache.

Typical use::

    from mmadapter.vision import FrozenCLIPEncoder, VisualProjectorV2, load_image
    clip = FrozenCLIPEncoder("ViT-L-14", pretrained="~/.cache/clip/ViT-L-14.pt")  # QuickGELU auto-detected
    tokens = clip.encode_images([load_image("cat.jpg", bgr_quirk=True)])  # (1, 257, 768)
    visual_prompt = VisualProjectorV2(clip.output_dim, 4096)(tokens)  # (1, 10, 4096)
    siglip = FrozenCLIPEncoder(pretrained="~/models/ViT-B-16-SigLIP")  # an open_clip download: (1, 197, 768)
"""

from mmadapter.vision.clip_encoder import FrozenCLIPEncoder
from mmadapter.vision.feature_cache import CLIPFeatureCache, WarmResult, content_key
from mmadapter.vision.images import (
    DEFAULT_MAX_PIXELS,
    SUPPORTED_FORMATS,
    ImageLoadError,
    decode_base64_image,
    load_image,
    load_image_bytes,
    swap_red_blue,
    to_rgb,
)
from mmadapter.vision.projector import VisualProjectorV1, VisualProjectorV2
from mmadapter.vision.tiny import TINY_MODELS, register_tiny_configs
from mmadapter.vision.transforms import clip_transform
from mmadapter.vision.visual_prompt import VisualPrompter
from mmadapter.vision.weights import read_state_dict

__all__ = [
    "CLIPFeatureCache",
    "DEFAULT_MAX_PIXELS",
    "FrozenCLIPEncoder",
    "ImageLoadError",
    "SUPPORTED_FORMATS",
    "TINY_MODELS",
    "VisualProjectorV1",
    "VisualProjectorV2",
    "VisualPrompter",
    "WarmResult",
    "clip_transform",
    "content_key",
    "decode_base64_image",
    "load_image",
    "load_image_bytes",
    "read_state_dict",
    "register_tiny_configs",
    "swap_red_blue",
    "to_rgb",
]
