"""A stage's resumable state: written every `save_every` steps, restored when a run resumes.

Exact resume needs the optimizer, LR schedule and grad scaler, every process's RNG state and the data
position (`Progress`); the files themselves are checkpointing.py's.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.optim.lr_scheduler import LRScheduler

from mmadapter.core.templates import template_record
from mmadapter.train.checkpointing import (
    CHECKPOINTS,
    RECIPE_FILE,
    ResumePoint,
    gathered_adapter,
    is_sharded,
    load_checkpoint,
    load_sharded_optimizer,
    partial_checkpoints,
    save_checkpoint,
    set_rng_state,
)
from mmadapter.train.recipe import AdapterSection, StageSection, absolute_adapter_paths, dump_recipe, load_recipe
from mmadapter.train.sharding import is_fsdp2
from mmadapter.train.state import Progress, Run

#: (optimizer, scheduler and scaler states or None, every process's RNG states), as `load_checkpoint` reads them.
ResumeState = tuple[dict | None, dict]


def unwrapped(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's wrapper (what torch.distributed.checkpoint reads)."""
    return getattr(optimizer, "optimizer", optimizer)


def save_training_state(
    run: Run,
    stage: StageSection,
    progress: Progress,
    optimizer: torch.optim.Optimizer | None,
    scheduler: LRScheduler | None,
) -> None:
    """A resumable checkpoint. Under FSDP2 every process saves its shard of the optimizer moments; under
    DeepSpeed they are not saved: a resumed run continues with exact data order, weights and schedule, but
    fresh AdamW moments."""
    accelerator = run.accelerator
    state = shards = None
    if optimizer is not None:
        state = {
            "scheduler": scheduler.state_dict(),
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
        }
        if is_fsdp2(accelerator):
            shards = (run.model, unwrapped(optimizer))
        elif not is_sharded(accelerator):
            state["optimizer"] = optimizer.state_dict()
    path = save_checkpoint(
        accelerator,
        run.output_dir,
        progress.global_step,
        model=run.model,
        adapter=gathered_adapter(accelerator, run.model),
        optimizer_state=state,
        optimizer_shards=shards,
        trainer_state=dataclasses.asdict(progress),
        recipe_yaml=dump_recipe(run.recipe),
        training=run.recipe.to_dict(),
        keep=stage.train.keep_checkpoints,
        **template_record(stage.data.template, run.tokenizer),
    )
    run.print(f"checkpoint: {path}")


def resume_from(run: Run, point: ResumePoint, progress: Progress) -> ResumeState:
    """Load the checkpoint a run continues from, after saying which damaged newer ones were passed over
    and removing checkpoints a killed run left half-written (the run writes its own again)."""
    for skipped in point.skipped:
        run.print(f"note: skipped {skipped}")
    if run.accelerator.is_main_process:
        for partial in partial_checkpoints(run.output_dir / CHECKPOINTS):
            shutil.rmtree(partial)
            run.print(f"note: removed {partial.name}, a checkpoint left half-written")
    check_same_adapter(run.recipe.adapter, point.checkpoint)
    run.print(f"resuming from {point.checkpoint} (stage {progress.stage_index + 1}, step {progress.step})")
    return load_checkpoint(point.checkpoint, run.model, run.accelerator.process_index)


def check_same_adapter(adapter: AdapterSection, checkpoint: Path) -> None:
    """Refuse to resume a checkpoint with another recipe's adapter (its weights would not fit the model)."""
    saved = dataclasses.asdict(absolute_adapter_paths(load_recipe(checkpoint / RECIPE_FILE).adapter))
    adapter = dataclasses.asdict(absolute_adapter_paths(adapter))
    changed = [key for key in sorted(saved.keys() | adapter.keys()) if saved.get(key) != adapter.get(key)]
    if changed:
        key = changed[0]
        raise ValueError(
            f"{checkpoint}: the run trained adapter.{key} = {saved.get(key)!r}, the recipe sets {adapter.get(key)!r}; "
            "resume with the run's own recipe (mmadapter train --resume RUN, without a RECIPE), or start a new run "
            "in another output_dir"
        )


def restore_training_state(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: LRScheduler,
    optimizer_state: dict | None,
    rng: dict,
) -> str | None:
    """Optimizer, LR schedule and grad scaler as checkpointed, then the RNG states (last: nothing may draw after).

    The schedule resumes at the checkpoint's step but with the recipe's peak learning rate, so `--set train.lr=…`
    on a resume is what trains; returns a note saying so when the peak differs from the checkpoint's."""
    note = None
    if optimizer_state is not None:
        shards, sharded = optimizer_state.get("optimizer_shards"), is_fsdp2(accelerator)
        if (shards is not None and not sharded) or (sharded and "optimizer" in optimizer_state):
            written = "with FSDP2" if shards is not None else "without FSDP2"
            raise ValueError(
                f"this checkpoint was written {written}: its optimizer state only resumes under the same kind of "
                "launch (same accelerate config and number of processes)"
            )
        if shards is not None:
            load_sharded_optimizer(Path(shards), model, unwrapped(optimizer))
        elif "optimizer" in optimizer_state:
            optimizer.load_state_dict(optimizer_state["optimizer"])
        planned = list(scheduler.base_lrs)
        scheduler.load_state_dict(optimizer_state["scheduler"])
        if scheduler.base_lrs != planned:
            note = (
                f"note: peak lr {planned[0]:.4g} (recipe) instead of the checkpoint's {scheduler.base_lrs[0]:.4g}; "
                f"the schedule continues from step {scheduler.last_epoch} with the recipe's"
            )
            scheduler.base_lrs = planned
            for group, peak, multiplier in zip(optimizer.param_groups, planned, scheduler.lr_lambdas, strict=True):
                group["lr"] = peak * multiplier(scheduler.last_epoch)
        if accelerator.scaler is not None and optimizer_state.get("scaler"):
            accelerator.scaler.load_state_dict(optimizer_state["scaler"])
    set_rng_state(rng)
    return note
