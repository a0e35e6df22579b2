"""Which samples go into which micro-batch, on which process: a pure function of (seed, epoch).

Because the order depends on nothing else, a resumed run replays it exactly and only needs the
epoch and the number of micro-batches already consumed. The order is also independent of how the
global batch is split: every optimizer step takes the next `batch_size * grad_accum * processes`
samples of one permutation, and micro-batch i of a step goes to process i mod P. With the loss
normalised by the step's token count (step.py), 1 process x batch 8 and 2 processes x batch 4
compute the same update.

Length grouping (like transformers' LengthGroupedSampler) sorts windows of 16 steps' worth of
samples by length, so padding is small while the order stays random across windows.
"""

from __future__ import annotations

import math

import torch

#: Steps' worth of samples sorted together when grouping by length.
GROUP_WINDOW_STEPS = 16


def epoch_batches(
    lengths: list[int],
    *,
    batch_size: int,
    grad_accum: int,
    num_processes: int,
    seed: int,
    epoch: int,
    group_by_length: bool,
) -> list[list[int]]:
    """All micro-batches of one epoch, in global order, as lists of sample indices.

    The count is cut to a multiple of `num_processes`, so every process runs the same number of
    steps (uneven counts would deadlock distributed training).
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if group_by_length:
        window = batch_size * grad_accum * num_processes * GROUP_WINDOW_STEPS
        order = [
            i
            for start in range(0, len(order), window)
            for i in sorted(order[start : start + window], key=lambda i: -lengths[i])
        ]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return batches[: len(batches) // num_processes * num_processes]


def process_batches(batches: list[list[int]], process_index: int, num_processes: int) -> list[list[int]]:
    return batches[process_index::num_processes]


def steps_per_epoch(num_micro_batches: int, grad_accum: int) -> int:
    """Optimizer steps in one epoch given one process's micro-batch count (the last step may be short)."""
    return math.ceil(num_micro_batches / grad_accum)


def eval_batches(lengths: list[int], batch_size: int, num_processes: int) -> tuple[list[list[int]], list[bool]]:
    """Evaluation batches sorted by length (least padding), padded with repeats of the first batch to a
    multiple of `num_processes` so every process runs as many forwards; the flags mark the repeats."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    extra = -len(batches) % num_processes
    return batches + [batches[0]] * extra, [False] * len(batches) + [True] * extra
