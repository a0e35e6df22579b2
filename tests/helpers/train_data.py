"""Tiny training data written in-process: Alpaca rows over the tiny tokenizer's words and one-colour images."""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 40), "blue": (40, 60, 220), "yellow": (230, 200, 20)}
SHAPES = ("circle", "square", "triangle")


def alpaca_rows(count: int, seed: int = 0) -> list[dict[str, str]]:
    """Short instruction rows over the tiny tokenizer's words: the answer is a function of the question."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        rows.append({"instruction": f"what colour is the {shape}", "input": f"a {colour} {shape}", "output": colour})
    return rows


def write_json(path: Path, value) -> Path:
    path.write_text(json.dumps(value))
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_image(path: Path, colour: str, size: int = 32) -> Path:
    Image.new("RGB", (size, size), COLOURS[colour]).save(path)
    return path
