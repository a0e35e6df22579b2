"""Run setup: a second training in another precision is refused in the recipe's words, not accelerate's."""

from __future__ import annotations

import pytest

from mmadapter.train.setup import plain_accelerator


def test_a_second_precision_in_one_process_names_the_recipe_key():
    plain_accelerator("no")  # what every CPU training of the test session creates
    plain_accelerator("no")  # the same precision again is fine
    with pytest.raises(ValueError, match=r"^train.mixed_precision: this process already trained in 'no'"):
        plain_accelerator("bf16")
