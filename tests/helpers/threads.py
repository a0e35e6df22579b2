"""One torch thread for a test module: tiny models run fastest so, and on a shared CPU several threads spin-wait for
each other. Import the fixture into a test module to use it (`from tests.helpers.threads import single_thread`)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    before = torch.get_num_threads()
    yield torch.set_num_threads(1)
    torch.set_num_threads(before)
