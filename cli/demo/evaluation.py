"""Held-out evaluation of the demo: generate captions and answers, read the attributes named in them.

Every held-out image is captioned and asked every question that applies to it; greedy decoding,
batched, with the image's visual prompt. A caption scores per attribute (does it name the right
colour, shape, count, size, position?), an answer scores on the attribute it was asked about.
The same function scores the untrained and the trained adapter, so the lift is measured, not
assumed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mmadapter.adapters.methods.llama_adapter_v2 import visual_prompter_of
from mmadapter.adapters.methods.prompt_attention import VISUAL_PROMPT_KWARG
from mmadapter.cli.demo import world
from mmadapter.core.progress import passing_bar
from mmadapter.core.templates import get_template
from mmadapter.serve.generate import GenerationEngine
from mmadapter.serve.sampling import SamplingParams

KINDS = ("caption", "answer")


@dataclasses.dataclass(frozen=True)
class Probe:
    """One generation to score: a caption of image `image` (attribute None) or one question about it."""

    image: int
    """Index into the held-out scenes (and their CLIP features)."""
    attribute: str | None
    instruction: str

    @property
    def kind(self) -> str:
        return "caption" if self.attribute is None else "answer"


def make_probes(scenes: Sequence[world.Scene]) -> list[Probe]:
    probes = []
    for index, scene in enumerate(scenes):
        probes.append(Probe(index, None, world.CAPTION_INSTRUCTION))
        probes += [Probe(index, attribute, question) for attribute, question, _ in world.questions(scene)]
    return probes


def is_correct(probe: Probe, scene: world.Scene, text: str, attribute: str) -> bool | None:
    """Whether `text` names `attribute` of `scene` correctly (None: not scored for this probe)."""
    truth = scene.attributes()[attribute]
    if truth is None or (probe.attribute is not None and probe.attribute != attribute):
        return None
    return world.read_attributes(text)[attribute] == truth


def score(probes: Sequence[Probe], texts: Sequence[str], scenes: Sequence[world.Scene]) -> dict[str, dict[str, Any]]:
    """{"caption": {attribute: accuracy}, "answer": {attribute: accuracy}, "counts": …} over all probes."""
    hits = {kind: {a: [] for a in world.ATTRIBUTES} for kind in KINDS}
    for probe, text in zip(probes, texts, strict=True):
        for attribute in world.ATTRIBUTES:
            correct = is_correct(probe, scenes[probe.image], text, attribute)
            if correct is not None:
                hits[probe.kind][attribute].append(correct)
    result: dict[str, dict[str, Any]] = {
        kind: {a: round(sum(v) / len(v), 4) for a, v in by_attr.items() if v} for kind, by_attr in hits.items()
    }
    result["counts"] = {kind: {a: len(v) for a, v in by_attr.items() if v} for kind, by_attr in hits.items()}
    return result


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer,
    probes: Sequence[Probe],
    clip_features: torch.Tensor,
    *,
    template: str = "alpaca",
    batch_size: int = 64,
    max_new_tokens: int = 16,
    desc: str = "evaluate",
) -> list[str]:
    """Greedy answers to every probe, each with its own image's visual prompt."""

    render = get_template(template).render
    engine = GenerationEngine(model, tokenizer)
    prompter = visual_prompter_of(model)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0)
    texts: list[str] = []
    for start in passing_bar(range(0, len(probes), batch_size), desc=desc, unit="batch"):
        chunk = probes[start : start + batch_size]
        features = clip_features[[p.image for p in chunk]]
        extra = {VISUAL_PROMPT_KWARG: prompter(clip_features=features)}
        completions = engine.generate([render(p.instruction) for p in chunk], params, model_inputs=extra)
        texts += [c.text.strip() for c in completions]
    return texts
