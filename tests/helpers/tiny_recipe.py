"""A training recipe for the tiny LLaMA, small enough that a few steps run in seconds on a CPU."""

from __future__ import annotations

from pathlib import Path

from mmadapter.train.recipe import parse_recipe
from tests.helpers.train_data import alpaca_rows, write_json

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


def tiny_recipe(
    folder: Path,
    tokenizer_dir: Path,
    data: list[dict] | None = None,
    method: str = "llama-adapter-v1",
    train: dict | None = None,
    data_options: dict | None = None,
    adapter: dict | None = None,
    parsed: bool = True,
    **top,
):
    """A recipe writing into `folder` (16 Alpaca rows unless `data` is given), as a raw mapping or parsed;
    keyword args override sections."""
    if data is None:
        data = [{"format": "alpaca", "path": str(write_json(folder / "alpaca.json", alpaca_rows(16)))}]
    document = {
        "name": "tiny",
        "output_dir": str(folder / "run"),
        "model": {"base": "tiny-llama", "tokenizer": str(tokenizer_dir)},
        "adapter": {"method": method, "options": dict(TINY_ADAPTERS[method]), **(adapter or {})},
        "train": {"batch_size": 4, "max_steps": 8, "lr": 0.05, "log_every": 1, "log_with": "none", **(train or {})},
        # The raw ChatGLM round format keeps tiny sequences short (the Alpaca preamble is ~120 tokens here).
        "data": {"train": data, "template": "chatglm", "max_length": 64, **(data_options or {})},
        **top,
    }
    return parse_recipe(document) if parsed else document
