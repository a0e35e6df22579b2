"""A state dict that does not fit is said in one short line: counts and two examples per kind."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmadapter.core.state_dicts import check_fits


def test_a_fitting_state_passes_and_a_misfit_is_counted_with_examples():
    module = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    state = module.state_dict()
    check_fits(module, state, "w.pth")  # nothing to say
    broken = {**state, "0.weight": torch.zeros(5, 4), "extra": torch.zeros(1)}
    del broken["1.bias"]
    with pytest.raises(ValueError) as error:
        check_fits(module, broken, "w.pth: weights do not fit", "use the right file")
    assert str(error.value) == (
        "w.pth: weights do not fit: 1 missing (e.g. 1.bias); 1 unexpected (e.g. extra); "
        "1 of another shape (e.g. 0.weight (5, 4) for (3, 4)); use the right file"
    )
