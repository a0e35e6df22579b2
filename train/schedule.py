"""Learning-rate schedules, as a multiplier of the peak learning rate per optimizer step.

`cosine` is the official LLaMA-Adapter schedule (util/lr_sched.py): linear warmup from 0, then a
half-cycle cosine down to min_lr, recomputed every iteration rather than every epoch. `linear` is
the transformers Trainer default that the official ChatGLM P-Tuning v2 scripts ran with.
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("cosine", "linear", "constant")


def lr_at(step: int, *, peak: float, total: int, warmup: int, schedule: str, min_lr: float = 0.0) -> float:
    """Learning rate used for optimizer step `step` (0-based) of `total`."""
    if step < warmup:
        return peak * step / warmup
    if schedule == "constant":
        return peak
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return min_lr + (peak - min_lr) * (1.0 - progress)
    raise ValueError(f"unknown schedule {schedule!r}; use {', '.join(SCHEDULES)}")


def make_scheduler(
    optimizer: torch.optim.Optimizer, *, peak: float, total: int, warmup: int, schedule: str, min_lr: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR (so its position saves and restores with state_dict) following `lr_at`."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; use {', '.join(SCHEDULES)}")

    def multiplier(step: int) -> float:
        return lr_at(step, peak=peak, total=total, warmup=warmup, schedule=schedule, min_lr=min_lr) / peak

    for group in optimizer.param_groups:
        group["lr"] = peak
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
