"""Fixtures for the training tests: a tokenizer folder and tiny recipes (no downloads)."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from tests.helpers.tiny_recipe import tiny_recipe


@pytest.fixture(scope="session")
def tokenizer_dir(tiny_tokenizer, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def make_recipe(tokenizer_dir, tmp_path):
    """Factory: a tiny recipe as a raw mapping or parsed (`parsed=True`); keyword args override sections."""
    return functools.partial(tiny_recipe, tmp_path, tokenizer_dir)
