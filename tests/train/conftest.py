"""Fixtures for the training tests: a tokenizer folder, tiny data files and tiny recipes (no downloads)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from PIL import Image

from mmadapter.train.recipe import parse_recipe

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 40), "blue": (40, 60, 220), "yellow": (230, 200, 20)}
SHAPES = ("circle", "square", "triangle")

#: Method -> adapter options small enough for the 4-layer, width-64 tiny LLaMA.
TINY_ADAPTERS = {
    "llama-adapter-v1": {"prompt_length": 4, "adapted_layers": 2},
    "llama-adapter-v2": {
        "prompt_length": 4,
        "first_adapted_layer": 2,
        "clip_model": "mmadapter-tiny-vit",
        "visual_width": 32,
        "visual_depth": 1,
        "visual_heads": 2,
    },
    "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
    "ptuning-v2": {"pre_seq_len": 4, "prefix_dropout": 0.0},
}


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


@pytest.fixture(scope="session")
def tokenizer_dir(tiny_tokenizer, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def make_recipe(tokenizer_dir, tmp_path):
    """Factory: a tiny recipe as a raw mapping or parsed (`parsed=True`); keyword args override sections."""

    def build(
        data: list[dict] | None = None,
        method: str = "llama-adapter-v1",
        train: dict | None = None,
        data_options: dict | None = None,
        adapter: dict | None = None,
        parsed: bool = True,
        **top,
    ):
        if data is None:
            data = [{"format": "alpaca", "path": str(write_json(tmp_path / "alpaca.json", alpaca_rows(16)))}]
        document = {
            "name": "tiny",
            "output_dir": str(tmp_path / "run"),
            "model": {"base": "tiny-llama", "tokenizer": str(tokenizer_dir)},
            "adapter": {"method": method, "options": dict(TINY_ADAPTERS[method]), **(adapter or {})},
            "train": {"batch_size": 4, "max_steps": 8, "lr": 0.05, "log_every": 1, "log_with": "none", **(train or {})},
            # The raw ChatGLM round format keeps tiny sequences short (the Alpaca preamble is ~120 tokens here).
            "data": {"train": data, "template": "chatglm", "max_length": 64, **(data_options or {})},
            **top,
        }
        return parse_recipe(document) if parsed else document

    return build
