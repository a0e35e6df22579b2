"""The LR schedule against the official util/lr_sched.py formula, and its state across a resume."""

from __future__ import annotations

import math

import pytest
import torch

from mmadapter.train.loop import train
from mmadapter.train.schedule import lr_at, make_scheduler


def official_lr(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """LLaMA-Adapter's adjust_learning_rate, written out plainly (epoch is fractional: step / steps per epoch)."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def test_cosine_matches_the_official_per_iteration_schedule():
    per_epoch, epochs, warmup_epochs = 7, 5, 2
    for step in range(per_epoch * epochs):
        expected = official_lr(step / per_epoch, 1.125e-3, 1e-5, warmup_epochs, epochs)
        actual = lr_at(
            step,
            peak=1.125e-3,
            total=per_epoch * epochs,
            warmup=per_epoch * warmup_epochs,
            schedule="cosine",
            min_lr=1e-5,
        )
        assert actual == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_linear_and_constant():
    assert [lr_at(s, peak=1.0, total=4, warmup=0, schedule="linear") for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert [lr_at(s, peak=1.0, total=4, warmup=2, schedule="constant") for s in range(4)] == [0.0, 0.5, 1.0, 1.0]
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        make_scheduler(
            torch.optim.SGD([torch.zeros(1, requires_grad=True)]), peak=1, total=4, warmup=0, schedule="step"
        )


def test_scheduler_follows_lr_at_and_resumes_from_its_state():
    def build():
        optimizer = torch.optim.AdamW([torch.zeros(2, requires_grad=True)], lr=123.0)
        return optimizer, make_scheduler(optimizer, peak=0.1, total=10, warmup=3, schedule="cosine", min_lr=0.01)

    optimizer, scheduler = build()
    seen = []
    for _ in range(10):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [lr_at(s, peak=0.1, total=10, warmup=3, schedule="cosine", min_lr=0.01) for s in range(10)]
    assert seen == pytest.approx(expected, rel=1e-12, abs=1e-15)
    optimizer, scheduler = build()
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    states = optimizer.state_dict(), scheduler.state_dict()
    optimizer, resumed = build()  # as the loop resumes: both states, the optimizer's carries the current lr
    optimizer.load_state_dict(states[0])
    resumed.load_state_dict(states[1])
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        resumed.step()
    assert lrs == pytest.approx(expected[4:], rel=1e-12, abs=1e-15)


def test_a_run_says_which_of_lr_and_base_lr_it_uses_when_both_are_set(make_recipe, capsys):
    train(make_recipe(train={"lr": 0.01, "base_lr": 0.5, "max_steps": 1}))
    assert "peak lr 0.01 (train.lr; base_lr is not used)" in capsys.readouterr().out
