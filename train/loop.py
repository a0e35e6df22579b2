"""The training loop: one loop for every adapter method and backbone, on one process or many.

Read top to bottom: `train` sets up a run (accelerate, model, adapter, trackers, resume) and walks the
recipe's stages; `run_stage` builds a stage, runs its steps and saves its outputs; `run_steps` is the
loop itself, and says when it logs, evaluates and saves. The parts live next door, one job each:
- setup.py: the accelerator, model and tokenizer of a run; a stage's trainable parameters, data,
  schedule and optimizer;
- step.py: one optimizer step (its micro-batches, gradient accumulation, statistics and checks);
- loss.py: the loss module and the eval loss; summary.py: log records, summaries, saved outputs;
- resume.py and checkpointing.py: resumable state; state.py: what a run holds and where it is.

Decisions worth knowing:
- The loss is the mean over response tokens of a whole optimizer step (step.py), so the update does
  not depend on how the global batch is split (1 process x batch 8 == 2 processes x batch 4 ==
  batch 4 x 2 accumulation steps). The official code averages per micro-batch, which is the same
  when all samples are equally long.
- Mixed runs (e.g. caption and instruction data in one stage): each sample updates only the
  parameters of its own kind (step.py `BackwardPerKind`; under FSDP2 `ForwardPerKind`).
- FSDP2 (sharding.py): the model is sharded once per run by the first stage; checkpoints then hold
  every process's shard of the optimizer state.
- Exact resume: batch order is a function of (seed, epoch) (batching.py), checkpoints hold the
  optimizer, scheduler, grad scaler, every process's RNG state and the data position, and the
  DataLoader gets its own generator so creating one never draws from the global RNG.
- A non-finite loss stops the run before the optimizer step, naming the step and the samples.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from tqdm.auto import tqdm

from mmadapter.adapters.backbones.presets import BASE_PRESETS, is_preset
from mmadapter.core.examples import DataError
from mmadapter.train.checkpointing import CHECKPOINTS, RECIPE_FILE, find_checkpoint, read_trainer_state
from mmadapter.train.data import resolve_recipe_templates
from mmadapter.train.loss import evaluate
from mmadapter.train.recipe import Recipe, StageSection, dump_recipe, with_absolute_paths
from mmadapter.train.reporting import flat_hparams
from mmadapter.train.resume import ResumeState, resume_from, save_training_state
from mmadapter.train.setup import StageSetup, build_model, check_input_paths, make_accelerator, setup_stage
from mmadapter.train.state import Progress, Run, TrainingStopped, TrainResult
from mmadapter.train.step import StepStats, accumulate_gradients, check_step, step_batches
from mmadapter.train.streaming import StreamedDataset, stream_steps
from mmadapter.train.summary import Window, log, run_summary, save_outputs, stage_summary

__all__ = ["TrainResult", "TrainingStopped", "train"]

ADAPTER_DIR = "adapter"
STAGES_DIR = "stages"


def train(
    recipe: Recipe,
    *,
    resume: str | Path | None = None,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Run a recipe; `resume` is a run folder or checkpoint to continue. Returns the final adapter.

    `model` (a base model, with or without the recipe's adapter attached) and `tokenizer` replace
    loading them from `recipe.model`; `on_log` receives every logged record (step, loss, lr, …).
    """
    output_dir = Path(recipe.output_dir)
    check_input_paths(recipe, model_given=model is not None, tokenizer_given=tokenizer is not None)
    recipe = with_absolute_paths(recipe, keep={name for name in BASE_PRESETS if is_preset(name)})
    point = find_checkpoint(resume) if resume is not None else None
    if point is None and any((output_dir / CHECKPOINTS).glob("ckpt-*")):
        raise ValueError(
            f"{output_dir} already has checkpoints: continue with --resume {output_dir}, or pick another output_dir"
        )
    accelerator = make_accelerator(recipe, output_dir)
    progress = Progress(**read_trainer_state(point.checkpoint)) if point else Progress()
    set_seed(recipe.stages[0].train.seed)  # before attaching, so the adapter's initialisation is reproducible
    model, tokenizer = build_model(recipe, model, tokenizer)
    resolve_recipe_templates(recipe, tokenizer, model.config.model_type)
    run = Run(recipe, accelerator, model, tokenizer, output_dir, on_log)
    resume_state = resume_from(run, point, progress) if point is not None else None
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / RECIPE_FILE).write_text(dump_recipe(recipe))
    if accelerator.log_with:
        accelerator.init_trackers(recipe.name, config=flat_hparams(recipe.to_dict()))
    try:
        return run_stages(run, progress, resume_state)
    finally:
        for tracker in accelerator.trackers:  # not end_training(): that also ends the process group, which
            tracker.finish()  # a caller training again in the same processes still needs
        accelerator.trackers = []


def run_stages(run: Run, progress: Progress, resume_state: ResumeState | None) -> TrainResult:
    """The recipe's stages from `progress.stage_index` on, then the final adapter and summary."""
    stages = run.recipe.stages
    for index in range(progress.stage_index, len(stages)):
        run_stage(run, index, stages[index], progress, resume_state)
        resume_state = None  # only the stage the checkpoint was taken in resumes mid-way
    summary = run_summary(run, progress)
    adapter_dir = run.output_dir / ADAPTER_DIR
    save_outputs(run, adapter_dir, summary, progress.finished_stages, stages[-1].data.template)
    run.print(f"adapter saved to {adapter_dir}")
    run.accelerator.wait_for_everyone()
    return TrainResult(adapter_dir, summary, run.accelerator.is_main_process)


def run_stage(run: Run, index: int, stage: StageSection, progress: Progress, resume_state: ResumeState | None) -> None:
    """Train one stage of the recipe from `progress` (fresh, or restored from a checkpoint)."""
    stages = run.recipe.stages
    trains = f" (trains {stage.trains})" if stage.trains else ""
    run.print(f"== stage {index + 1}/{len(stages)}: {stage.name}{trains}")
    try:
        setup = setup_stage(run, stage, resume_state)
    except (ValueError, FileNotFoundError) as error:
        if index == 0 or resume_state is not None:
            raise
        # The earlier stages are trained and checkpointed at this boundary: say how not to lose them.
        kind = next(k for k in (DataError, FileNotFoundError, ValueError) if isinstance(error, k))
        raise kind(
            f"{error}; stages before {stage.name!r} are trained and kept: fix this stage's data or settings and "
            f"continue with `mmadapter train --resume {run.output_dir}` (--set KEY=VALUE to change them)"
        ) from error
    run_steps(run, stage, setup, progress)

    # The stage's adapter, summary and curve; the next stage starts from here.
    summary = stage_summary(stage, progress, setup.report, setup.bad)
    progress.finished_stages.append(summary)
    if len(stages) > 1:
        save_outputs(run, run.output_dir / STAGES_DIR / stage.name, summary, [summary], stage.data.template)
    progress.next_stage()
    if index + 1 < len(stages):  # always: a later stage that fails (its data, its settings) resumes from here
        save_training_state(run, stage, progress, None, None)
    run.print(setup.bad.summary())


def run_steps(run: Run, stage: StageSection, setup: StageSetup, progress: Progress) -> None:
    """Optimizer steps until the stage's last; a log record, an evaluation, a checkpoint when due (the
    last step always logs and evaluates; its checkpoint is the one at the stage's end)."""
    accelerator, config, total = run.accelerator, stage.train, setup.schedule.total_steps
    # `with`: the bar is closed on an error too, so the error's message starts a line of its own.
    with tqdm(
        total=total, initial=progress.step, desc=stage.name, disable=not accelerator.is_local_main_process
    ) as bar:
        batch_steps = stream_steps if isinstance(setup.dataset, StreamedDataset) else step_batches
        steps = batch_steps(
            setup.dataset, setup.collate, stage, progress, accelerator.num_processes, accelerator.process_index
        )
        window = Window()
        setup.loss_module.train()
        while progress.step < total:
            started = time.perf_counter()
            batches, epoch, micro_batch = next(steps)
            stats = accumulate_gradients(accelerator, setup.loss_module, batches, setup.route)
            check_step(run, stage, progress, stats, setup.bad, len(setup.dataset), epoch)
            lr, grad_norm = optimizer_step(accelerator, setup, config.grad_clip, stats)
            seconds = time.perf_counter() - started
            progress.step_done(epoch, micro_batch, stats.tokens, seconds)
            window.add(stats, seconds)
            bar.update(1)

            last = progress.step == total
            if progress.step % config.log_every == 0 or last:
                log_window(run, progress, window.record(stage.name, progress, lr, grad_norm), bar)
            if setup.eval_set is not None and ((config.eval_every and progress.step % config.eval_every == 0) or last):
                evaluate_stage(run, stage, setup, progress)
            if config.save_every and progress.step % config.save_every == 0 and not last:
                save_training_state(run, stage, progress, setup.optimizer, setup.scheduler)


def optimizer_step(
    accelerator: Accelerator, setup: StageSetup, grad_clip: float | None, stats: StepStats
) -> tuple[float, float | None]:
    """Clip, update, advance the schedule; returns the step's learning rate and gradient norm (if clipped)."""
    grad_norm = None
    if grad_clip is not None:
        grad_norm = float(accelerator.clip_grad_norm_(setup.route.params, grad_clip))
    lr = setup.optimizer.param_groups[0]["lr"]
    if stats.response_tokens > 0:  # a step whose samples were all unusable changes nothing
        setup.optimizer.step()
    setup.scheduler.step()
    setup.optimizer.zero_grad(set_to_none=True)
    return lr, grad_norm


def log_window(run: Run, progress: Progress, record: dict[str, Any], bar: tqdm) -> None:
    """Keep a log record in the stage's history, send it to the trackers, show it on the progress bar."""
    progress.history.append(record)
    log(run, record)
    loss = record["loss"] or float("nan")
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_second']:.0f}")


def evaluate_stage(run: Run, stage: StageSection, setup: StageSetup, progress: Progress) -> None:
    """Eval loss on the stage's eval set, kept in the stage's evals and logged; then back to training."""
    result = evaluate(run.accelerator, setup.loss_module, setup.eval_set, setup.collate, stage.train.batch_size)
    result.update(stage=stage.name, step=progress.step, global_step=progress.global_step)
    progress.evals.append(result)
    log(run, result)
    setup.loss_module.train()
