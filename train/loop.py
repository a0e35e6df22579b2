"""The training loop: one loop for every adapter method and backbone, on one process or many.

Read top to bottom: `train` sets up a run (accelerate, model, adapter, trackers, resume) and walks
the recipe's stages; `run_stage` is the loop itself; the helpers below it do one thing each.

Decisions worth knowing:
- What trains comes only from the adapter's selector (`mark_trainable` / `trainable_parameters`),
  per stage: LLaMA-Adapter V2's caption stage and instruction stage update disjoint sets.
- The loss is the mean over response tokens of a whole optimizer step: every micro-batch's
  summed token losses are divided by the step's response-token count over all micro-batches and
  processes. So the update does not depend on how the global batch is split (1 process x batch 8
  == 2 processes x batch 4 == batch 4 x 2 accumulation steps). The official code averages per
  micro-batch, which is the same when all samples are equally long.
- Mixed runs (e.g. caption and instruction data in one stage): each sample updates only the
  parameters of its own kind. One forward pass, then one backward per kind restricted with
  `inputs=` to that kind's parameters; gradients are then averaged across processes explicitly,
  because DDP's hooks expect exactly one backward per forward.
- Exact resume: batch order is a function of (seed, epoch) (batching.py), checkpoints hold the
  optimizer, scheduler, grad scaler, every process's RNG state and the data position, and the
  DataLoader gets its own generator so creating one never draws from the global RNG.
- A non-finite loss stops the run before the optimizer step, naming the step and the samples.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import ProjectConfiguration, set_seed
from torch import nn
from tqdm.auto import tqdm

from mmadapter.adapters.backbones.loading import load_base_model, load_tokenizer
from mmadapter.adapters.backbones.presets import BASE_PRESETS
from mmadapter.adapters.io.checkpoint import load_adapter_weights, save_adapter
from mmadapter.adapters.methods.base import (
    adapter_config_of,
    attach_adapter,
    make_config,
    optimizer_param_groups,
    trainable_parameters,
)
from mmadapter.adapters.methods.report import format_report, parameter_report
from mmadapter.core.encoding import IGNORE_INDEX
from mmadapter.core.examples import DataError
from mmadapter.train.batching import epoch_batches, eval_batches, process_batches, steps_per_epoch
from mmadapter.train.checkpointing import (
    CHECKPOINTS,
    RECIPE_FILE,
    find_checkpoint,
    gathered_adapter,
    is_sharded,
    load_checkpoint,
    read_trainer_state,
    save_checkpoint,
    set_rng_state,
)
from mmadapter.train.data import BadSampleLog, Collator, SupervisedDataset, load_samples, sample_kinds
from mmadapter.train.multimodal import image_loader_for, model_inputs
from mmadapter.train.recipe import Recipe, StageSection, dump_recipe
from mmadapter.train.reporting import CURVE_FILE, flat_hparams, plot_loss_curve, tracker_for, write_summary
from mmadapter.train.schedule import make_scheduler

ADAPTER_DIR = "adapter"
STAGES_DIR = "stages"


class TrainingStopped(RuntimeError):
    """The run cannot go on (non-finite loss, too many bad samples); the message says why and where."""


@dataclasses.dataclass
class Progress:
    """Where a run is; saved as trainer_state.json in every checkpoint."""

    stage_index: int = 0
    step: int = 0
    """Optimizer steps done in the current stage."""
    epoch: int = 0
    micro_batch: int = 0
    """Micro-batches this process has consumed in `epoch`."""
    global_step: int = 0
    tokens: int = 0
    wall_time: float = 0.0
    bad_runtime: int = 0
    """Samples masked out during the stage because their image failed to load (all processes)."""
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)
    evals: list[dict[str, float]] = dataclasses.field(default_factory=list)
    finished_stages: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def next_stage(self) -> None:
        """Finish the current stage: counters restart, `global_step` and finished stages carry on."""
        fresh = Progress(stage_index=self.stage_index + 1, global_step=self.global_step)
        fresh.finished_stages = self.finished_stages
        self.__dict__.update(fresh.__dict__)


@dataclasses.dataclass
class TrainResult:
    adapter_dir: Path
    """The trained adapter (load with `mmadapter.adapters.load_adapter`)."""
    summary: dict[str, Any]
    """What training_summary.json holds."""
    main_process: bool = True
    """False in the other processes of a multi-process run (they return the same result)."""


@dataclasses.dataclass
class Run:
    """Everything the stages share."""

    recipe: Recipe
    accelerator: Any
    model: nn.Module
    tokenizer: Any
    output_dir: Path
    on_log: Callable[[dict[str, Any]], None] | None

    def print(self, *args: Any) -> None:
        if self.accelerator.is_main_process:
            tqdm.write(" ".join(str(a) for a in args))


def train(
    recipe: Recipe,
    *,
    resume: str | Path | None = None,
    model: nn.Module | None = None,
    tokenizer=None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Run a recipe; `resume` is a run folder or checkpoint to continue. Returns the final adapter.

    `model` (a base model, with or without the recipe's adapter attached) and `tokenizer` replace
    loading them from `recipe.model`; `on_log` receives every logged record (step, loss, lr, …).
    """

    output_dir = Path(recipe.output_dir)
    checkpoint = find_checkpoint(resume) if resume is not None else None
    if checkpoint is None and any((output_dir / CHECKPOINTS).glob("ckpt-*")):
        raise ValueError(
            f"{output_dir} already has checkpoints: continue with --resume {output_dir}, or pick another output_dir"
        )
    accelerator = make_accelerator(recipe, output_dir)
    progress = Progress(**read_trainer_state(checkpoint)) if checkpoint else Progress()

    set_seed(recipe.stages[0].train.seed)  # before attaching, so the adapter's initialisation is reproducible
    model, tokenizer = build_model(recipe, model, tokenizer)
    run = Run(recipe, accelerator, model, tokenizer, output_dir, on_log)
    resume_state = None
    if checkpoint is not None:
        run.print(f"resuming from {checkpoint} (stage {progress.stage_index + 1}, step {progress.step})")
        resume_state = load_checkpoint(checkpoint, model, accelerator.process_index)

    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / RECIPE_FILE).write_text(dump_recipe(recipe))
    if accelerator.log_with:
        accelerator.init_trackers(recipe.name, config=flat_hparams(recipe.to_dict()))
    try:
        for index, stage in enumerate(recipe.stages):
            if index >= progress.stage_index:
                run_stage(run, index, stage, progress, resume_state if index == progress.stage_index else None)
                resume_state = None
        summary = run_summary(run, progress)
        adapter_dir = output_dir / ADAPTER_DIR
        save_outputs(run, adapter_dir, summary, progress.finished_stages, recipe.stages[-1].data.template)
        run.print(f"adapter saved to {adapter_dir}")
        accelerator.wait_for_everyone()
    finally:
        for tracker in accelerator.trackers:  # not end_training(): that also ends the process group, which
            tracker.finish()  # a caller training again in the same processes still needs
        accelerator.trackers = []
    return TrainResult(adapter_dir, summary, accelerator.is_main_process)


def run_stage(run: Run, index: int, stage: StageSection, progress: Progress, resume_state) -> None:
    """Train one stage of the recipe from `progress` (fresh, or restored from a checkpoint)."""
    accelerator, model, config, data = run.accelerator, run.model, stage.train, stage.data
    stages = run.recipe.stages
    run.print(
        f"== stage {index + 1}/{len(stages)}: {stage.name}" + (f" (trains {stage.trains})" if stage.trains else "")
    )

    # 1. What trains: the selector alone, for every kind of data in this stage.
    kinds = sample_kinds(data.train, stage.trains)
    params_by_kind = {kind: list(trainable_parameters(model, kind).values()) for kind in kinds}
    model.requires_grad_(False)
    for params in params_by_kind.values():
        for param in params:
            param.requires_grad_(True)
    report = stage_report(model, kinds)
    run.print(format_report(report))
    mixed = len(kinds) > 1
    if mixed and accelerator.distributed_type.value not in ("NO", "MULTI_CPU", "MULTI_GPU"):
        raise ValueError(
            f"stage {stage.name!r}: mixed data kinds need one process or DDP, not {accelerator.distributed_type}"
        )

    # 2. Data: every row read, validated and tokenized now; images load per batch.
    dataset, eval_set, bad = load_stage_data(run, stage, kinds)
    collate = Collator(pad_token_id=pad_token_id(run.tokenizer))

    # 3. Schedule: optimizer steps from epochs (or max_steps), LR from lr or base_lr x global batch / 256.
    processes = accelerator.num_processes
    plan = dict(batch_size=config.batch_size, grad_accum=config.grad_accum, num_processes=processes)
    micro_per_epoch = len(epoch_batches(dataset.lengths(), seed=0, epoch=0, group_by_length=False, **plan)) // processes
    if micro_per_epoch == 0:
        raise DataError(f"stage {stage.name!r}: {len(dataset)} samples make less than one batch per process")
    per_epoch = steps_per_epoch(micro_per_epoch, config.grad_accum)
    total_steps = config.max_steps or math.ceil(config.epochs * per_epoch)
    warmup = config.warmup_steps if config.warmup_steps is not None else round(config.warmup_epochs * per_epoch)
    global_batch = config.batch_size * config.grad_accum * processes
    peak_lr = config.lr if config.lr is not None else config.base_lr * global_batch / 256
    run.print(
        f"schedule: {total_steps} steps ({per_epoch} per epoch), global batch {global_batch}, peak lr {peak_lr:.4g} "
        f"({config.schedule}, {warmup} warmup steps), weight decay {config.weight_decay}"
    )

    # 4. Optimizer with the official grouping (no decay on 1-D tensors and biases), schedule, accelerate.
    groups = [g for kind in kinds for g in optimizer_param_groups(model, config.weight_decay, kind) if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=peak_lr, betas=config.betas, eps=config.eps)
    scheduler = make_scheduler(
        optimizer, peak=peak_lr, total=total_steps, warmup=warmup, schedule=config.schedule, min_lr=config.min_lr
    )
    accelerator.free_memory()
    loss_module, optimizer = accelerator.prepare(TokenLoss(model), optimizer)
    if resume_state is not None:
        restore_training_state(accelerator, optimizer, scheduler, *resume_state)

    # 5. The loop.
    bar = tqdm(total=total_steps, initial=progress.step, desc=stage.name, disable=not accelerator.is_local_main_process)
    steps = step_batches(dataset, collate, data, config, progress, processes, accelerator.process_index)
    trainable = [p for params in params_by_kind.values() for p in params]
    window = Window()
    loss_module.train()
    while progress.step < total_steps:
        started = time.perf_counter()
        batches, epoch, micro_batch = next(steps)
        stats = accumulate_gradients(accelerator, loss_module, batches, params_by_kind, kinds, mixed)
        check_step(run, stage, progress, stats, bad, len(dataset), epoch)

        grad_norm = None
        if config.grad_clip is not None:
            grad_norm = float(accelerator.clip_grad_norm_(trainable, config.grad_clip))
        lr = scheduler.get_last_lr()[0]
        if stats["count"] > 0:  # a step whose samples were all unusable changes nothing
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        seconds = time.perf_counter() - started
        progress.step += 1
        progress.global_step += 1
        progress.epoch, progress.micro_batch = epoch, micro_batch
        progress.tokens += int(stats["tokens"])
        progress.wall_time += seconds
        window.add(stats, seconds)
        bar.update(1)

        last = progress.step == total_steps
        if progress.step % config.log_every == 0 or last:
            record = window.record(stage.name, progress, lr, grad_norm)
            progress.history.append(record)
            log(run, record)
            bar.set_postfix(
                loss=f"{record['loss'] or float('nan'):.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_second']:.0f}"
            )
        if eval_set is not None and ((config.eval_every and progress.step % config.eval_every == 0) or last):
            result = evaluate(accelerator, loss_module, eval_set, collate, config.batch_size)
            result.update(stage=stage.name, step=progress.step, global_step=progress.global_step)
            progress.evals.append(result)
            log(run, result)
            loss_module.train()
        if config.save_every and progress.step % config.save_every == 0 and not last:
            save_training_state(run, stage, progress, optimizer, scheduler)
    bar.close()

    # 6. The stage's adapter, summary and curve; the next stage starts from here.
    summary = stage_summary(stage, progress, report, bad)
    progress.finished_stages.append(summary)
    if len(stages) > 1:
        save_outputs(run, run.output_dir / STAGES_DIR / stage.name, summary, [summary], stage.data.template)
    progress.next_stage()
    if config.save_every and index + 1 < len(stages):
        save_training_state(run, stage, progress, None, None)
    run.print(bad.summary())


# ---------------------------------------------------------------- setting up


def make_accelerator(recipe: Recipe, output_dir: Path):
    """One Accelerator for the run (mixed precision, trackers, DDP options come from the first stage)."""

    config = recipe.stages[0].train
    precision = config.mixed_precision
    notes = []
    if precision == "fp16" and not torch.cuda.is_available():
        precision = "no"
        notes.append("fp16 mixed precision needs a GPU; training in float32 (bf16 works on CPUs)")
    tracker, note = tracker_for(config.log_with)
    notes += [note] if note else []
    accelerator = plain_accelerator(
        precision,
        log_with=tracker,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=config.ddp_find_unused_parameters)],
    )
    if accelerator.distributed_type.value == "DEEPSPEED" and any(s.train.grad_accum > 1 for s in recipe.stages):
        raise ValueError("under DeepSpeed set train.grad_accum: 1 and raise train.batch_size instead")
    for note in notes:
        if accelerator.is_main_process:
            tqdm.write(f"note: {note}")
    return accelerator


def plain_accelerator(precision: str = "no", **kwargs):
    """An Accelerator; in a single process, a later run may use another precision than an earlier one."""

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != precision and PartialState().num_processes == 1:
        AcceleratorState._reset_state()  # accelerate keeps the first precision for the whole process otherwise
    # Without cpu=True accelerate does not see torchrun's processes on a machine without an accelerator.
    return Accelerator(mixed_precision=precision, cpu=not has_accelerator_device(), **kwargs)


def has_accelerator_device() -> bool:
    if hasattr(torch, "accelerator"):
        return torch.accelerator.is_available()
    return torch.cuda.is_available()  # pragma: no cover - torch < 2.6


def build_model(recipe: Recipe, model: nn.Module | None, tokenizer) -> tuple[nn.Module, Any]:
    """The base model with the recipe's adapter attached (or `init_from`'s weights), and its tokenizer."""

    section = recipe.model
    if tokenizer is None:
        folder = section.tokenizer or section.base
        if folder in BASE_PRESETS:
            raise ValueError(
                f"model.tokenizer: base {folder!r} is a preset without a tokenizer; set a tokenizer folder"
            )
        tokenizer = load_tokenizer(folder)
    if model is None:
        model = load_base_model(section.base, dtype=section.dtype, attn_implementation=section.attn_implementation)
    if getattr(model, "adapter_config", None) is None:
        try:
            config = make_config(recipe.adapter.method, recipe.adapter.preset, **recipe.adapter.options)
        except (TypeError, ValueError) as error:
            raise ValueError(f"adapter: {error}") from error
        attach_adapter(model, config)
        if recipe.adapter.init_from:
            load_adapter_weights(model, recipe.adapter.init_from)
    elif adapter_config_of(model).method != recipe.adapter.method:
        raise ValueError(
            f"adapter.method is {recipe.adapter.method!r} but the given model carries {adapter_config_of(model).method!r}"
        )
    return model, tokenizer


def pad_token_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate
    return 0  # pragma: no cover


def stage_report(model: nn.Module, kinds: list[str | None]) -> dict[str, Any]:
    """The parameter report of a stage; a mixed stage reports the union of its kinds."""
    reports = [parameter_report(model, kind) for kind in kinds]
    if len(reports) == 1:
        return reports[0]
    merged = dict(reports[0], stage="+".join(str(k) for k in kinds))
    merged["groups"] = {g: n for r in reports for g, n in r["groups"].items()}
    merged["trainable_params"] = sum(r["trainable_params"] for r in reports)
    merged["trainable_fraction"] = merged["trainable_params"] / max(merged["total_params"], 1)
    return merged


def load_stage_data(run: Run, stage: StageSection, kinds: list[str | None]):
    """(training set, eval set or None, bad-sample log) of a stage, images checked or cached up front."""
    accelerator, data = run.accelerator, stage.data
    bad = BadSampleLog(data.on_bad_sample, data.max_bad_fraction)
    show = accelerator.is_local_main_process
    samples = load_samples(data.train, run.tokenizer, data, kinds, stage.trains, bad, show_progress=show)
    eval_samples = samples[: data.eval_from_train]
    if data.eval:
        eval_samples += load_samples(data.eval, run.tokenizer, data, kinds, stage.trains, bad, show_progress=show)
    loader = eval_loader = None
    with_images = list({s.source: s for s in samples + eval_samples if s.image is not None}.values())
    if with_images:
        with accelerator.main_process_first():  # one process fills the CLIP feature cache, the others read it
            loader, unreadable = image_loader_for(run.model, data.clip_cache, with_images, show)
        eval_loader = loader if data.clip_cache else image_loader_for(run.model, None, [], show, train=False)[0]
        for sample in unreadable:
            bad.add(sample)
        skip = {s.source for s in unreadable}
        samples = [s for s in samples if s.source not in skip]
        eval_samples = [s for s in eval_samples if s.source not in skip]
        bad.check_fraction(f"stage {stage.name!r} images", len(unreadable), len(samples) + len(unreadable))
    if not samples:
        raise DataError(f"stage {stage.name!r}: no usable training samples ({bad.summary(limit=3)})")
    run.print(f"data: {len(samples)} training samples, {len(eval_samples)} eval samples; {bad.summary(limit=5)}")
    dataset = SupervisedDataset(samples, loader, seed=stage.train.seed)
    return dataset, (SupervisedDataset(eval_samples, eval_loader) if eval_samples else None), bad


def restore_training_state(accelerator, optimizer, scheduler, optimizer_state: dict | None, rng: dict) -> None:
    """Optimizer, LR schedule and grad scaler as checkpointed, then the RNG states (last: nothing may draw after)."""
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state["optimizer"])
        scheduler.load_state_dict(optimizer_state["scheduler"])
        if accelerator.scaler is not None and optimizer_state.get("scaler"):
            accelerator.scaler.load_state_dict(optimizer_state["scaler"])
    set_rng_state(rng)


# ---------------------------------------------------------------- one optimizer step


class TokenLoss(nn.Module):
    """Model forward + per-token next-token loss, in one module so DDP/FSDP see a single forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, **images):
        logits = self.model(**model_inputs(self.model, input_ids, attention_mask, images)).logits
        shifted = labels[:, 1:]
        losses = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), shifted.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
        )
        return losses.view_as(shifted)


def step_batches(dataset, collate, data, config, progress: Progress, processes: int, process_index: int):
    """Yield (micro-batches of one optimizer step, epoch, micro-batches consumed in it), forever.

    Starts at `progress.epoch` / `progress.micro_batch`, so a resumed run continues exactly.
    """
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


def accumulate_gradients(accelerator, loss_module, batches, params_by_kind, kinds, mixed: bool) -> dict[str, Any]:
    """Forward and backward every micro-batch of one step; returns the step's statistics (all processes)."""
    device, processes = accelerator.device, accelerator.num_processes
    # Response tokens per kind over the whole step and all processes: the loss denominators.
    local = torch.zeros(len(kinds) + 1, device=device)
    for batch in batches:
        valid = batch["labels"][:, 1:] != IGNORE_INDEX
        for k in range(len(kinds)):
            local[k] += (valid & (batch["kinds"][:, None] == k)).sum()
        local[-1] += batch["attention_mask"].sum()
    totals = accelerator.reduce(local, "sum") if processes > 1 else local
    counts, tokens = totals[:-1], totals[-1]

    loss_sum, nonfinite, runtime_bad = 0.0, [], []
    for i, batch in enumerate(batches):
        runtime_bad += batch["bad"]
        sync = i == len(batches) - 1 and not mixed  # mixed runs average gradients by hand below
        with contextlib.nullcontext() if sync else accelerator.no_sync(loss_module):
            losses = loss_module(**batch_tensors(batch, device))
            valid = batch["labels"][:, 1:].to(device) != IGNORE_INDEX
            per_sample = torch.where(valid, losses, 0.0).sum(dim=1)
            sums = per_sample.detach().tolist()
            loss_sum += sum(sums)
            nonfinite += [
                source for source, value in zip(batch["sources"], sums, strict=True) if not math.isfinite(value)
            ]
            kind_of = batch["kinds"].to(device)
            # x processes: DDP averages gradients over processes, the loss is a mean over all of them.
            losses_by_kind = [
                torch.where(kind_of == k, per_sample, 0.0).sum() * processes / counts[k].clamp(min=1)
                for k in range(len(kinds))
            ]
            if not mixed:
                accelerator.backward(losses_by_kind[0])
            else:
                for k, kind in enumerate(kinds):
                    retain = k < len(kinds) - 1
                    accelerator.backward(losses_by_kind[k], inputs=params_by_kind[kind], retain_graph=retain)
    if mixed:
        average_gradients(accelerator, params_by_kind, kinds, counts)

    flags = torch.tensor([loss_sum, float(len(nonfinite)), float(len(runtime_bad))], device=device)
    flags = accelerator.reduce(flags, "sum") if processes > 1 else flags
    return {
        "loss_sum": float(flags[0]),
        "count": float(counts.sum()),
        "tokens": float(tokens),
        "nonfinite": bool(flags[1] > 0),
        "nonfinite_sources": nonfinite,
        "runtime_bad": int(flags[2]),
        "runtime_bad_local": runtime_bad,
    }


def average_gradients(accelerator, params_by_kind, kinds, counts: torch.Tensor) -> None:
    """Mixed runs: average gradients over processes by hand (one flat all-reduce). Kinds absent from
    the whole step get no gradient at all, so AdamW leaves their parameters untouched."""
    params = [p for kind in kinds for p in params_by_kind[kind]]
    if accelerator.num_processes > 1:
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
        flat = accelerator.reduce(flat, "mean")
        offset = 0
        for p in params:
            p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
    for k, kind in enumerate(kinds):
        if counts[k] == 0:
            for p in params_by_kind[kind]:
                p.grad = None


def batch_tensors(batch: dict[str, Any], device) -> dict[str, torch.Tensor]:
    names = ("input_ids", "attention_mask", "labels", "pixel_values", "clip_features", "image_mask")
    return {name: batch[name].to(device) for name in names if name in batch}


def check_step(run: Run, stage: StageSection, progress: Progress, stats, bad: BadSampleLog, total: int, epoch: int):
    """Stop (every process at once, before the update) on a non-finite loss or too many unreadable images."""
    for sample in stats["runtime_bad_local"]:
        bad.add(sample, upfront=False)  # raises under on_bad_sample=fail
    if stats["runtime_bad"] and bad.policy == "fail":
        raise DataError("another process found an unreadable image (data.on_bad_sample=fail); see its message")
    progress.bad_runtime += stats["runtime_bad"]
    if progress.bad_runtime > bad.max_fraction * total:
        raise TrainingStopped(
            f"stage {stage.name!r}: {progress.bad_runtime} of {total} samples had unreadable images, more than "
            f"data.max_bad_fraction ({bad.max_fraction:.1%}); {bad.summary(limit=3)}"
        )
    if stats["nonfinite"]:
        where = ", ".join(stats["nonfinite_sources"][:8]) or "on another process"
        latest = sorted((run.output_dir / CHECKPOINTS).glob("ckpt-*"))
        hint = f" The last checkpoint is {latest[-1]}." if latest else ""
        raise TrainingStopped(
            f"stage {stage.name!r}: non-finite loss at step {progress.step + 1} (epoch {epoch}); samples: {where}. "
            f"This step was not applied.{hint} Lower the learning rate, set train.grad_clip, or use bf16 "
            "instead of fp16."
        )


class Window:
    """Sums between two log lines: response-token loss, tokens and time."""

    def __init__(self) -> None:
        self.loss = self.count = self.tokens = self.seconds = 0.0

    def add(self, stats: dict[str, Any], seconds: float) -> None:
        self.loss += stats["loss_sum"]
        self.count += stats["count"]
        self.tokens += stats["tokens"]
        self.seconds += seconds

    def record(self, stage: str, progress: Progress, lr: float, grad_norm: float | None) -> dict[str, Any]:
        record = {
            "stage": stage,
            "step": progress.step,
            "global_step": progress.global_step,
            # None when every sample of the window was unusable (e.g. all images unreadable)
            "loss": self.loss / self.count if self.count else None,
            "lr": lr,
            "tokens_per_second": self.tokens / max(self.seconds, 1e-9),
        }
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        self.__init__()
        return record


# ---------------------------------------------------------------- evaluation, logging, saving


@torch.no_grad()
def evaluate(accelerator, loss_module, dataset, collate, batch_size: int) -> dict[str, float]:
    """Mean loss per response token over `dataset` (shared out over processes), and its perplexity."""
    loss_module.eval()
    batches, padding = eval_batches(dataset.lengths(), batch_size, accelerator.num_processes)
    mine = process_batches(
        list(zip(batches, padding, strict=True)), accelerator.process_index, accelerator.num_processes
    )
    totals = torch.zeros(2, device=accelerator.device)
    for indices, is_padding in mine:
        batch = collate([dataset[i] for i in indices])
        if is_padding:  # keeps forward counts equal on every process; contributes nothing
            batch["labels"].fill_(IGNORE_INDEX)
        losses = loss_module(**batch_tensors(batch, accelerator.device))
        valid = batch["labels"][:, 1:].to(accelerator.device) != IGNORE_INDEX
        totals += torch.stack([torch.where(valid, losses, 0.0).sum(), valid.sum().float()])
    if accelerator.num_processes > 1:
        totals = accelerator.reduce(totals, "sum")
    loss = float(totals[0] / totals[1].clamp(min=1))
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": int(totals[1])}


def log(run: Run, record: dict[str, Any]) -> None:
    numbers = {k: v for k, v in record.items() if isinstance(v, int | float) and k not in ("step", "global_step")}
    run.accelerator.log({f"{record['stage']}/{k}": v for k, v in numbers.items()}, step=record["global_step"])
    if run.on_log is not None and run.accelerator.is_main_process:
        run.on_log(dict(record))


def save_training_state(run: Run, stage: StageSection, progress: Progress, optimizer, scheduler) -> None:
    """A resumable checkpoint. Under FSDP / DeepSpeed the optimizer moments are shards and are not saved:
    a resumed run continues with exact data order, weights and schedule, but fresh AdamW moments."""
    accelerator = run.accelerator
    state = None
    if optimizer is not None and not is_sharded(accelerator):
        state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
        }
    path = save_checkpoint(
        accelerator,
        run.output_dir,
        progress.global_step,
        model=run.model,
        adapter=gathered_adapter(accelerator, run.model),
        optimizer_state=state,
        trainer_state=dataclasses.asdict(progress),
        recipe_yaml=dump_recipe(run.recipe),
        training=run.recipe.to_dict(),
        prompt_template=stage.data.template,
        keep=stage.train.keep_checkpoints,
    )
    run.print(f"checkpoint: {path}")


def stage_summary(stage: StageSection, progress: Progress, report: dict[str, Any], bad: BadSampleLog) -> dict:
    losses = [h["loss"] for h in progress.history if h["loss"] is not None]
    eval_losses = [e["eval_loss"] for e in progress.evals]
    return {
        "stage": stage.name,
        "adapter_stage": stage.trains,
        "steps": progress.step,
        "tokens": progress.tokens,
        "wall_time_seconds": round(progress.wall_time, 3),
        "tokens_per_second": progress.tokens / max(progress.wall_time, 1e-9),
        "final_loss": losses[-1] if losses else None,
        "best_loss": min(losses) if losses else None,
        "final_eval_loss": eval_losses[-1] if eval_losses else None,
        "best_eval_loss": min(eval_losses) if eval_losses else None,
        "parameters": report,
        "bad_samples": {
            "skipped": bad.upfront,
            "masked_during_training": progress.bad_runtime,
            "examples": [str(b) for b in bad.samples[:20]],
        },
        "history": progress.history,
        "evals": progress.evals,
    }


def run_summary(run: Run, progress: Progress) -> dict[str, Any]:
    """The run's summary: the last stage's results, totals over stages, and every stage's own summary."""
    stages = progress.finished_stages
    tokens = sum(s["tokens"] for s in stages)
    wall = sum(s["wall_time_seconds"] for s in stages)
    last = stages[-1]
    config = adapter_config_of(run.model)
    return {
        "recipe": run.recipe.name,
        "method": config.method,
        "adapter": config.to_dict(),
        "steps": sum(s["steps"] for s in stages),
        "tokens": tokens,
        "wall_time_seconds": round(wall, 3),
        "tokens_per_second": tokens / max(wall, 1e-9),
        "final_loss": last["final_loss"],
        "best_loss": last["best_loss"],
        "final_eval_loss": last["final_eval_loss"],
        "best_eval_loss": last["best_eval_loss"],
        "parameters": last["parameters"],
        "stages": stages,
    }


def save_outputs(run: Run, directory: Path, summary: dict[str, Any], stages: list[dict], template: str) -> None:
    """Adapter + training_summary.json + loss_curve.png in `directory` (every process calls; the main one writes)."""
    adapter = gathered_adapter(run.accelerator, run.model)
    if not run.accelerator.is_main_process:
        return
    save_adapter(run.model, directory, prompt_template=template, training=run.recipe.to_dict(), state_dict=adapter)
    write_summary(summary, directory)
    message = plot_loss_curve(stages, directory / CURVE_FILE, title=run.recipe.name)
    if message:
        run.print(f"note: {message}")
