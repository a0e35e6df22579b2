"""One optimizer step: which micro-batches make it, their forward and backward passes, its statistics,
and the checks that stop a run before the update.

The loss is the mean over response tokens of the whole step: every micro-batch's summed token losses
are divided by the step's response-token count over all micro-batches and processes, so the update
does not depend on how the global batch is split.

How gradients flow is chosen once per stage: `OneBackward` when every sample trains the same
parameters, `BackwardPerKind` when a stage mixes kinds of data (e.g. captions and instructions) and
each sample may update only its own kind's parameters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from mmadapter.core.encoding import IGNORE_INDEX
from mmadapter.core.examples import DataError
from mmadapter.train.batching import epoch_batches, process_batches
from mmadapter.train.checkpointing import CHECKPOINTS
from mmadapter.train.data import BadSampleLog, Collator, SupervisedDataset
from mmadapter.train.loss import batch_tensors
from mmadapter.train.readers import BadSample
from mmadapter.train.recipe import StageSection
from mmadapter.train.state import Progress, Run, TrainingStopped


def step_batches(
    dataset: SupervisedDataset,
    collate: Collator,
    stage: StageSection,
    progress: Progress,
    processes: int,
    process_index: int,
) -> Iterator[tuple[list[dict[str, Any]], int, int]]:
    """Yield (micro-batches of one optimizer step, epoch, micro-batches consumed in it), forever.

    Starts at `progress.epoch` / `progress.micro_batch`, so a resumed run continues exactly.
    """
    data, config = stage.data, stage.train
    epoch, start = progress.epoch, progress.micro_batch
    while True:
        batches = epoch_batches(
            dataset.lengths(),
            batch_size=config.batch_size,
            grad_accum=config.grad_accum,
            num_processes=processes,
            seed=config.seed,
            epoch=epoch,
            group_by_length=data.group_by_length,
        )
        mine = process_batches(batches, process_index, processes)
        dataset.epoch = epoch
        if start < len(mine):
            loader = torch.utils.data.DataLoader(
                dataset,
                batch_sampler=mine[start:],
                collate_fn=collate,
                num_workers=data.num_workers,
                generator=torch.Generator(),  # never draw from the global RNG (exact resume)
            )
            group, consumed = [], start
            for batch in loader:
                group.append(batch)
                consumed += 1
                if len(group) == config.grad_accum or consumed == len(mine):
                    yield group, epoch, consumed
                    group = []
        epoch, start = epoch + 1, 0


@dataclasses.dataclass
class StepStats:
    """One optimizer step, summed over its micro-batches and all processes (`*_here`: this process)."""

    loss_sum: float
    """Summed loss of the step's response tokens."""
    response_tokens: float
    """The loss denominator; 0 when every sample was unusable, and then the step changes nothing."""
    tokens: float
    """All attended tokens (prompts too), for throughput."""
    nonfinite: bool
    """Some sample, on some process, had a non-finite loss."""
    nonfinite_here: list[str]
    """Sources of this process's samples with a non-finite loss."""
    unreadable: int
    """Samples masked out because their image failed to load."""
    unreadable_here: list[BadSample]


class OneBackward:
    """Every sample trains the same parameters: one backward per micro-batch, and DDP (or FSDP2's
    reduce-scatter) averages the gradients over processes in the last micro-batch's backward (the
    others skip its sync)."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params
        self.kinds = 1

    def sync(self, accelerator: Accelerator, loss_module: nn.Module, last: bool) -> AbstractContextManager:
        return contextlib.nullcontext() if last else accelerator.no_sync(loss_module)

    def forward_backward(
        self, accelerator: Accelerator, forward: Callable[[], torch.Tensor], kinds: torch.Tensor, counts: torch.Tensor
    ) -> torch.Tensor:
        per_sample = forward()
        # x processes: DDP averages gradients over processes, the loss is a mean over all of them.
        accelerator.backward(per_sample.sum() * accelerator.num_processes / counts[0].clamp(min=1))
        return per_sample

    def finish(self, accelerator: Accelerator, counts: torch.Tensor) -> None:
        """Nothing left to do: DDP has averaged the gradients."""


class BackwardPerKind:
    """Samples update only their own kind's parameters: one forward, then one backward per kind
    restricted with `inputs=`. DDP's hooks expect exactly one backward per forward, so DDP never
    syncs and `finish` averages the gradients over processes by hand."""

    def __init__(self, params_by_kind: dict[str | None, list[nn.Parameter]]) -> None:
        self.params_by_kind = params_by_kind
        self.params = [p for params in params_by_kind.values() for p in params]
        self.kinds = len(params_by_kind)

    def sync(self, accelerator: Accelerator, loss_module: nn.Module, last: bool) -> AbstractContextManager:
        return accelerator.no_sync(loss_module)

    def forward_backward(
        self, accelerator: Accelerator, forward: Callable[[], torch.Tensor], kinds: torch.Tensor, counts: torch.Tensor
    ) -> torch.Tensor:
        per_sample = forward()
        for k, params in enumerate(self.params_by_kind.values()):
            # x processes: the gradients are averaged over processes, the loss is a mean over all of them.
            loss = torch.where(kinds == k, per_sample, 0.0).sum() * accelerator.num_processes / counts[k].clamp(min=1)
            accelerator.backward(loss, inputs=params, retain_graph=k < self.kinds - 1)
        return per_sample

    def finish(self, accelerator: Accelerator, counts: torch.Tensor) -> None:
        """Average over processes (one flat all-reduce). Kinds absent from the whole step get no
        gradient at all, so AdamW leaves their parameters untouched."""
        if accelerator.num_processes > 1:
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in self.params])
            flat = accelerator.reduce(flat, "mean")
            offset = 0
            for p in self.params:
                p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
                offset += p.numel()
        drop_absent_kinds(self.params_by_kind, counts)


class ForwardPerKind:
    """Mixed kinds under FSDP2: backward's `inputs=` cannot name sharded parameters (the graph holds the
    gathered copies), so every kind present in the step gets its own forward and backward of the
    micro-batch, and the gradients that backward gave the other kinds' parameters are dropped (their
    gradients so far are put back). FSDP2 averages over processes in every backward (no `no_sync`: what
    is put back must be the reduced shard). Costs one forward per kind instead of one."""

    def __init__(self, params_by_kind: dict[str | None, list[nn.Parameter]]) -> None:
        self.params_by_kind = params_by_kind
        self.params = [p for params in params_by_kind.values() for p in params]
        self.kinds = len(params_by_kind)

    def sync(self, accelerator: Accelerator, loss_module: nn.Module, last: bool) -> AbstractContextManager:
        return contextlib.nullcontext()

    def forward_backward(
        self, accelerator: Accelerator, forward: Callable[[], torch.Tensor], kinds: torch.Tensor, counts: torch.Tensor
    ) -> torch.Tensor:
        per_sample = None
        for k, params in enumerate(self.params_by_kind.values()):
            if counts[k] == 0:  # the same on every process: counts are over all of them
                continue
            mine = {id(p) for p in params}
            others = [p for p in self.params if id(p) not in mine]
            kept = [p.grad for p in others]
            for p in others:
                p.grad = None
            per_sample = forward()
            loss = torch.where(kinds == k, per_sample, 0.0).sum() * accelerator.num_processes / counts[k].clamp(min=1)
            accelerator.backward(loss)
            for p, grad in zip(others, kept, strict=True):
                p.grad = grad
        if per_sample is None:  # no response tokens anywhere: the losses are for the statistics only
            with torch.no_grad():
                per_sample = forward()
        return per_sample

    def finish(self, accelerator: Accelerator, counts: torch.Tensor) -> None:
        drop_absent_kinds(self.params_by_kind, counts)


def drop_absent_kinds(params_by_kind: dict[str | None, list[nn.Parameter]], counts: torch.Tensor) -> None:
    """Kinds absent from the whole step get no gradient at all, so AdamW leaves their parameters untouched."""
    for k, params in enumerate(params_by_kind.values()):
        if counts[k] == 0:
            for p in params:
                p.grad = None


def backward_for(
    params_by_kind: dict[str | None, list[nn.Parameter]], sharded: bool = False
) -> OneBackward | BackwardPerKind | ForwardPerKind:
    """How a stage's gradients flow: per kind only when the stage mixes kinds of data."""
    if len(params_by_kind) == 1:
        (params,) = params_by_kind.values()
        return OneBackward(params)
    return ForwardPerKind(params_by_kind) if sharded else BackwardPerKind(params_by_kind)


def accumulate_gradients(
    accelerator: Accelerator,
    loss_module: nn.Module,
    batches: list[dict[str, Any]],
    route: OneBackward | BackwardPerKind | ForwardPerKind,
) -> StepStats:
    """Forward and backward every micro-batch of one step; returns the step's statistics (all processes)."""
    counts, tokens = count_tokens(accelerator, batches, route.kinds)
    per_sample_losses = []
    for i, batch in enumerate(batches):
        forward = functools.partial(per_sample_loss, loss_module, batch_tensors(batch, accelerator.device))
        with route.sync(accelerator, loss_module, last=i == len(batches) - 1):
            per_sample = route.forward_backward(accelerator, forward, batch["kinds"].to(accelerator.device), counts)
        per_sample_losses.append(per_sample.detach())
    route.finish(accelerator, counts)
    return step_stats(accelerator, batches, per_sample_losses, counts, tokens)


def per_sample_loss(loss_module: nn.Module, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed token losses of each sample of a micro-batch (B,)."""
    return loss_module(**tensors).sum(dim=1)


def count_tokens(
    accelerator: Accelerator, batches: list[dict[str, Any]], kinds: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Response tokens per kind over the whole step and all processes (the loss denominators), and all
    attended tokens; known before the first backward, which needs them."""
    local = torch.zeros(kinds + 1, device=accelerator.device)
    for batch in batches:
        valid = batch["labels"][:, 1:] != IGNORE_INDEX
        for k in range(kinds):
            local[k] += (valid & (batch["kinds"][:, None] == k)).sum()
        local[-1] += batch["attention_mask"].sum()
    totals = accelerator.reduce(local, "sum") if accelerator.num_processes > 1 else local
    return totals[:-1], totals[-1]


def step_stats(
    accelerator: Accelerator,
    batches: list[dict[str, Any]],
    per_sample_losses: list[torch.Tensor],
    counts: torch.Tensor,
    tokens: torch.Tensor,
) -> StepStats:
    """The step's statistics: one device-to-host copy of the per-sample losses, one sum over processes."""
    values = torch.cat(per_sample_losses).tolist()
    loss_sum, nonfinite, unreadable, start = 0.0, [], [], 0
    for batch in batches:
        sums = values[start : start + len(batch["sources"])]
        start += len(sums)
        loss_sum += sum(sums)
        nonfinite += [source for source, value in zip(batch["sources"], sums, strict=True) if not math.isfinite(value)]
        unreadable += batch["bad"]
    flags = torch.tensor([loss_sum, float(len(nonfinite)), float(len(unreadable))], device=accelerator.device)
    flags = accelerator.reduce(flags, "sum") if accelerator.num_processes > 1 else flags
    return StepStats(
        loss_sum=float(flags[0]),
        response_tokens=float(counts.sum()),
        tokens=float(tokens),
        nonfinite=bool(flags[1] > 0),
        nonfinite_here=nonfinite,
        unreadable=int(flags[2]),
        unreadable_here=unreadable,
    )


def check_step(
    run: Run, stage: StageSection, progress: Progress, stats: StepStats, bad: BadSampleLog, total: int, epoch: int
) -> None:
    """Stop (every process at once, before the update) on a non-finite loss or too many unreadable images."""
    for sample in stats.unreadable_here:
        bad.add(sample, upfront=False)  # raises under on_bad_sample=fail
    if stats.unreadable and bad.policy == "fail":
        raise DataError("another process found an unreadable image (data.on_bad_sample=fail); see its message")
    progress.bad_runtime += stats.unreadable
    if progress.bad_runtime > bad.max_fraction * total:
        raise TrainingStopped(
            f"stage {stage.name!r}: {progress.bad_runtime} of {total} samples had unreadable images, more than "
            f"data.max_bad_fraction ({bad.max_fraction:.1%}); {bad.summary(limit=3)}"
        )
    if stats.nonfinite:
        where = ", ".join(stats.nonfinite_here[:8]) or "on another process"
        latest = sorted((run.output_dir / CHECKPOINTS).glob("ckpt-*"))
        hint = f" The last checkpoint is {latest[-1]}." if latest else ""
        raise TrainingStopped(
            f"stage {stage.name!r}: non-finite loss at step {progress.step + 1} (epoch {epoch}); samples: {where}. "
            f"This step was not applied.{hint} Lower the learning rate, set train.grad_clip, or use bf16 "
            "instead of fp16."
        )
