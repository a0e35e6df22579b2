"""One chat turn, the same for the terminal, the HTTP API and the web demo.

A turn is the new user message, the finished (user, assistant) exchanges before it, and an
optional image. The adapter's prompt template renders them (the official multimodal prompt is
Alpaca without input, with the question as the instruction; the image enters only through the
visual prompt), the image becomes a visual prompt once, and the engine streams the answer.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import torch
from PIL import Image

from mmadapter.adapters.methods.llama_adapter_v2 import ENCODER_ATTRIBUTE, visual_prompt
from mmadapter.adapters.methods.prompt_attention import VISUAL_PROMPT_KWARG
from mmadapter.serve.generate import TextDelta
from mmadapter.serve.loader import ServedModel
from mmadapter.serve.prompting import encode_chat
from mmadapter.serve.sampling import SamplingParams
from mmadapter.vision.feature_cache import content_key
from mmadapter.vision.images import swap_red_blue, to_rgb

#: Visual prompts kept for images seen lately (one generation worker uses them, so no lock is needed).
RECENT_IMAGES = 8


class ImageNotSupportedError(ValueError):
    """An image was sent to a model whose adapter has no visual input."""


@dataclasses.dataclass
class ChatTurn:
    message: str
    history: Sequence[tuple[str, str]] = ()
    image: Image.Image | None = None
    params: SamplingParams | None = None
    """None: the served model's defaults."""


@dataclasses.dataclass
class TurnStarted:
    """First event of a turn: the prompt is accepted and generation begins."""

    prompt_tokens: int


@torch.inference_mode()
def visual_inputs(served: ServedModel, image: Image.Image | None) -> dict[str, torch.Tensor]:
    """The forward arguments carrying the image, computed once per request (empty for text models)."""
    if not served.takes_images:
        if image is not None:
            raise ImageNotSupportedError(
                f"this model ({served.method or 'no adapter'}) does not take images; send text only"
            )
        return {}

    model = served.model
    if image is None:
        # Text only: what the adapter was trained with (a zero image or nothing); frozen, so computed once.
        if "text_only_visual_prompt" not in served.cache:
            served.cache["text_only_visual_prompt"] = visual_prompt(model)
        prompt = served.cache["text_only_visual_prompt"]
    else:
        # Clients send the conversation's image again with every turn: run CLIP once per picture.
        recent: OrderedDict[str, torch.Tensor] = served.cache.setdefault("visual_prompts", OrderedDict())
        key = content_key(image)
        prompt = recent.get(key)
        if prompt is None:
            encoder = getattr(model, ENCODER_ATTRIBUTE)
            image = to_rgb(image)
            if model.adapter_config.image_channel_order == "bgr":
                image = swap_red_blue(image)  # official checkpoints saw BGR pixels presented as RGB (spec §3.8)
            prompt = visual_prompt(model, pixel_values=encoder.transform()(image).unsqueeze(0))
            recent[key] = prompt
            if len(recent) > RECENT_IMAGES:
                recent.popitem(last=False)
        recent.move_to_end(key)
    return {} if prompt is None else {VISUAL_PROMPT_KWARG: prompt}


def stream_turn(served: ServedModel, turn: ChatTurn) -> Iterator[TurnStarted | TextDelta]:
    """Yield `TurnStarted`, then the answer's text deltas; closing the iterator stops generation.

    Raises `PromptTooLongError` / `ImageNotSupportedError` (ValueErrors) before anything is yielded.
    """
    params = turn.params or served.defaults
    params = params.replace(stop=tuple(dict.fromkeys(served.template.stop + params.stop)))
    ids = encode_chat(served.tokenizer, served.model.config.model_type, served.template, turn.message, turn.history)
    served.engine.check_prompt_length(len(ids))
    model_inputs = visual_inputs(served, turn.image)
    yield TurnStarted(len(ids))
    yield from served.engine.stream([ids], params, model_inputs)
