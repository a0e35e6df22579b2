"""A tokenizer whose vocabulary does not fit the base model's embedding is refused before training, in the
recipe's words, instead of torch's `IndexError: index out of range in self` at the first batch holding a
token past the last row."""

from __future__ import annotations

import pytest

from mmadapter.train.data import check_token_ids
from mmadapter.train.loop import train
from tests.helpers.tiny_tokenizer import TINY_WORDS, build_tiny_tokenizer


def test_a_tokenizer_bigger_than_the_embedding_is_refused_before_training(make_recipe, tmp_path):
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_tokens(list(TINY_WORDS))  # the data's words now encode past the 256 embedding rows
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(512 - len(tokenizer))])
    folder = tmp_path / "tokenizer-512"
    tokenizer.save_pretrained(folder)
    recipe = make_recipe(model={"base": "tiny-llama", "tokenizer": str(folder)})
    message = (
        r"^model.tokenizer: the tokenizer has 512 tokens but the base model's embedding has 256 rows "
        r"\(token id \d+ in .*alpaca.json\[0\]\); use the base model's tokenizer$"
    )
    with pytest.raises(ValueError, match=message):
        train(recipe)


def test_a_padding_token_past_the_embedding_is_refused(tiny_tokenizer):
    with pytest.raises(ValueError, match=r"has 256 rows \(its padding token id 300\); use the base model's"):
        check_token_ids([], tiny_tokenizer, pad_id=300, rows=256)
