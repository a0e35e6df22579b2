"""A deterministic synthetic image world for the embedded demo: shapes, captions, questions, answers.

Every image is a `Scene` drawn from a seed and its index alone (so the train / held-out split is by
image and any image can be re-rendered on the fly): one to three shapes of one kind, colour and size
on a pale, noisy gradient background; single shapes sit at a named position. Each scene has a
caption, visual questions with one-word or short answers, and the world has a small text-only
instruction set. The wording is fixed so that answers can be scored by looking for words
(`read_attributes`), which is how the demo measures what the model learned.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
from PIL import Image, ImageDraw

#: Fill colours (RGB), chosen to stay distinct from each other and from the pale backgrounds.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (30, 150, 50),
    "blue": (35, 70, 215),
    "yellow": (235, 200, 20),
    "purple": (135, 50, 175),
    "orange": (240, 125, 15),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond")
SIZES: tuple[str, ...] = ("small", "large")
#: Where a single shape sits, as (x, y) fractions of the image side.
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "middle": (0.5, 0.5),
}
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
POSITION_PHRASES["middle"] = "in the middle"
NUMBERS: tuple[str, ...] = ("one", "two", "three")
#: Pale background tones; each image blends two of them in a gradient.
BACKGROUNDS: tuple[tuple[int, int, int], ...] = (
    (245, 245, 240),
    (225, 225, 225),
    (240, 230, 205),
    (215, 230, 245),
    (245, 220, 225),
    (220, 240, 220),
)
#: Shape radius as a fraction of the image side, by size word.
RADIUS = {"small": 0.11, "large": 0.2}
#: The official LLaMA-Adapter V2 caption instruction (spec §3.6).
CAPTION_INSTRUCTION = "Generate caption of this image"

#: The attributes the demo scores, in report order.
ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "count", "size", "position")
QUESTIONS: dict[str, tuple[str, ...]] = {
    "colour": ("What colour is the shape?", "Which colour do you see?", "What is the colour of the object?"),
    "shape": ("What shape is in the image?", "Which shape do you see?", "What kind of shape is this?"),
    "count": ("How many shapes are there?", "How many objects do you see?", "Count the shapes."),
    "size": ("Is the shape small or large?", "How big is the shape?"),
    "position": ("Where is the shape?", "Where is the object in the image?"),
}


@dataclasses.dataclass(frozen=True)
class Scene:
    """One image of the world: what is drawn and where (pixel units of `image_size`)."""

    index: int
    colour: str
    shape: str
    size: str
    count: int
    position: str | None
    """Named position of a single shape; None when there are several."""
    centres: tuple[tuple[float, float], ...]
    """Shape centres as fractions of the image side."""
    radius: float
    """Shape radius as a fraction of the image side."""
    background: tuple[tuple[int, int, int], tuple[int, int, int]]
    noise_seed: int

    def attributes(self) -> dict[str, str | None]:
        return {
            "colour": self.colour,
            "shape": self.shape,
            "count": NUMBERS[self.count - 1],
            "size": self.size,
            "position": self.position,
        }


def _scatter(rng: np.random.Generator, count: int, radius: float) -> list[tuple[float, float]]:
    """Non-overlapping centres for `count` shapes (rejection sampling, deterministic per rng)."""
    margin = radius + 0.03
    for _ in range(1000):
        centres = [tuple(rng.uniform(margin, 1 - margin, size=2)) for _ in range(count)]
        if all(math.dist(a, b) > 2 * radius + 0.04 for i, a in enumerate(centres) for b in centres[i + 1 :]):
            return centres
    raise RuntimeError(f"could not place {count} shapes of radius {radius}")  # pragma: no cover


def make_scene(seed: int, index: int) -> Scene:
    """The scene with this index in the world of this seed; independent of how many are made."""
    rng = np.random.default_rng([seed, index])
    colour = str(rng.choice(list(COLOURS)))
    shape = str(rng.choice(SHAPES))
    size = str(rng.choice(SIZES))
    count = int(rng.integers(1, 4))
    radius = RADIUS[size] * float(rng.uniform(0.9, 1.1))
    if count == 1:
        position = str(rng.choice(list(POSITIONS)))
        x, y = POSITIONS[position]
        jitter = rng.uniform(-0.05, 0.05, size=2)
        centres = [(x + float(jitter[0]), y + float(jitter[1]))]
    else:
        position = None
        radius *= 0.75  # several large shapes must fit side by side
        centres = _scatter(rng, count, radius)
    first, second = rng.choice(len(BACKGROUNDS), size=2, replace=False)
    return Scene(
        index=index,
        colour=colour,
        shape=shape,
        size=size,
        count=count,
        position=position,
        centres=tuple((float(x), float(y)) for x, y in centres),
        radius=radius,
        background=(BACKGROUNDS[first], BACKGROUNDS[second]),
        noise_seed=int(rng.integers(2**31)),
    )


def split_scenes(seed: int, num_train: int, num_heldout: int) -> tuple[list[Scene], list[Scene]]:
    """Train and held-out scenes: disjoint image indices, so no held-out image is ever trained on."""
    train = [make_scene(seed, i) for i in range(num_train)]
    heldout = [make_scene(seed, num_train + i) for i in range(num_heldout)]
    return train, heldout


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, image_size: int = 64) -> Image.Image:
    """Draw the scene as an RGB image (drawn at 4x and downsampled, so edges are anti-aliased)."""
    scale = 4
    side = image_size * scale
    t = np.linspace(0.0, 1.0, image_size)[:, None, None]
    first, second = (np.array(c, dtype=np.float32) for c in scene.background)
    gradient = first * (1 - t) + second * t  # (H, 1, 3): top to bottom
    noise = np.random.default_rng(scene.noise_seed).normal(0.0, 4.0, size=(image_size, image_size, 3))
    pixels = np.clip(np.broadcast_to(gradient, (image_size, image_size, 3)) + noise, 0, 255).astype(np.uint8)
    canvas = Image.fromarray(pixels).resize((side, side), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(canvas)
    fill = COLOURS[scene.colour]
    r = scene.radius * side
    for fx, fy in scene.centres:
        cx, cy = fx * side, fy * side
        if scene.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(_polygon(scene.shape, cx, cy, r), fill=fill)
    return canvas.resize((image_size, image_size), Image.Resampling.BOX)


def caption(scene: Scene) -> str:
    """ "a large red circle on the left", "three small blue stars"."""
    if scene.count == 1:
        return f"a {scene.size} {scene.colour} {scene.shape} {POSITION_PHRASES[scene.position]}"
    return f"{NUMBERS[scene.count - 1]} {scene.size} {scene.colour} {scene.shape}s"


def answer(scene: Scene, attribute: str) -> str:
    if attribute == "position":
        return POSITION_PHRASES[scene.position]
    return scene.attributes()[attribute]


def questions(scene: Scene) -> list[tuple[str, str, str]]:
    """(attribute, question, answer) for every attribute the scene defines (position: single shapes)."""
    items = []
    for attribute, phrasings in QUESTIONS.items():
        if attribute == "position" and scene.position is None:
            continue
        question = phrasings[(scene.index + len(items)) % len(phrasings)]
        items.append((attribute, question, answer(scene, attribute)))
    return items


_MIXES = {("red", "yellow"): "orange", ("blue", "yellow"): "green", ("red", "blue"): "purple"}
_SIDES = {"triangle": "three", "square": "four", "diamond": "four"}
_OPPOSITES = {"left": "right", "right": "left", "top": "bottom", "bottom": "top", "small": "large", "large": "small"}


def instructions() -> list[tuple[str, str]]:
    """The text-only instruction set: (instruction, response) facts about the same small world."""
    items = [(f"What colour do you get by mixing {a} and {b}?", mix) for (a, b), mix in _MIXES.items()]
    items += [(f"What colour do you get by mixing {b} and {a}?", mix) for (a, b), mix in _MIXES.items()]
    items += [(f"How many sides does a {shape} have?", sides) for shape, sides in _SIDES.items()]
    items += [("How many points does a star have?", "five"), ("Which shape is round?", "circle")]
    items += [("Name a shape with three sides.", "triangle"), ("Which shape has five points?", "star")]
    items += [(f"What is the opposite of {word}?", other) for word, other in _OPPOSITES.items()]
    items += [(f"What is the plural of {shape}?", f"{shape}s") for shape in SHAPES]
    for i, a in enumerate(NUMBERS):
        for j, b in enumerate(NUMBERS):
            if i + j + 2 <= len(NUMBERS):
                items.append((f"What is {a} plus {b}?", NUMBERS[i + j + 1]))
    items += [(f"Spell the colour {colour}.", " ".join(colour)) for colour in COLOURS]
    items += [("Count from one to three.", "one two three"), ("List the shapes you know.", ", ".join(SHAPES))]
    items += [("List the colours you know.", ", ".join(COLOURS))]
    return items


_WORDS = re.compile(r"[a-z]+")
_PLURAL = {f"{shape}s": shape for shape in SHAPES}
_PHRASE_TO_POSITION = {phrase.split()[-1]: name for name, phrase in POSITION_PHRASES.items()}


def read_attributes(text: str) -> dict[str, str | None]:
    """The first colour, shape, number, size and position word found in `text` (None if absent)."""
    found: dict[str, str | None] = dict.fromkeys(ATTRIBUTES)
    for word in _WORDS.findall(text.lower()):
        word = _PLURAL.get(word, word)
        if word in COLOURS:
            found["colour"] = found["colour"] or word
        elif word in SHAPES:
            found["shape"] = found["shape"] or word
        elif word in SIZES:
            found["size"] = found["size"] or word
        elif word in NUMBERS or word == "a":
            found["count"] = found["count"] or ("one" if word == "a" else word)
        elif word in _PHRASE_TO_POSITION:
            found["position"] = found["position"] or _PHRASE_TO_POSITION[word]
    return found
