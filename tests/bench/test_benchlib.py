"""What the benchmark scripts share (bench/benchlib.py): the GPU clock recorded beside serving timings."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_gpu_clock_reports_the_median_of_its_samples_and_nothing_off_cuda(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    from benchlib import GPUClock

    readings = itertools.cycle([345, 1980, 1980])  # idle, then boost: the median is the boost clock
    monkeypatch.setattr(torch.cuda, "clock_rate", lambda device=None: next(readings))
    with GPUClock("cuda:0") as clock:
        deadline = time.monotonic() + 10
        while len(clock.samples) < 3 and time.monotonic() < deadline:  # a sample each 50 ms, later when loaded
            time.sleep(0.05)
    assert len(clock.samples) >= 3 and clock.median_mhz == 1980
    with GPUClock("cpu") as clock:
        time.sleep(0.1)
    assert clock.median_mhz is None

    def no_nvml(device=None):
        raise ModuleNotFoundError("pynvml")

    monkeypatch.setattr(torch.cuda, "clock_rate", no_nvml)
    with GPUClock("cuda:0") as clock:
        time.sleep(0.1)
    assert clock.median_mhz is None
