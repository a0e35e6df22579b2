"""Everything built before the first step: a run's accelerator, model and tokenizer; a stage's
trainable parameters, data, schedule and optimizer.

What trains comes only from the adapter's selector (`mark_trainable` / `trainable_parameters`), per
stage: LLaMA-Adapter V2's caption stage and instruction stage update disjoint sets.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs, PartialState
from accelerate.state import AcceleratorState, is_initialized
from accelerate.utils import DistributedType, ProjectConfiguration
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from tqdm.auto import tqdm

from mmadapter.adapters.backbones.loading import load_base_model, load_tokenizer
from mmadapter.adapters.backbones.presets import BASE_PRESETS, is_preset
from mmadapter.adapters.backbones.quantization import check_quantization
from mmadapter.adapters.io.checkpoint import load_adapter_weights
from mmadapter.adapters.methods.base import (
    adapter_config_of,
    attach_adapter,
    make_config,
    optimizer_param_groups,
    trainable_parameters,
)
from mmadapter.adapters.methods.report import format_report, parameter_report
from mmadapter.core.examples import DataError
from mmadapter.train.batching import epoch_batches, steps_per_epoch
from mmadapter.train.data import (
    BadSampleLog,
    Collator,
    SupervisedDataset,
    check_token_ids,
    load_samples,
    sample_kinds,
    supervised_view,
)
from mmadapter.train.loss import TokenLoss
from mmadapter.train.multimodal import image_loader_for
from mmadapter.train.recipe import ModelSection, Recipe, StageSection, TrainSection
from mmadapter.train.reporting import tracker_for
from mmadapter.train.resume import ResumeState, restore_training_state
from mmadapter.train.schedule import make_scheduler
from mmadapter.train.sharding import (
    check_deepspeed_launch,
    enable_fsdp2,
    is_fsdp2,
    set_deepspeed_micro_batch,
    shard_loss_module,
)
from mmadapter.train.state import Run
from mmadapter.train.step import BackwardPerKind, ForwardPerKind, OneBackward, backward_for
from mmadapter.train.streaming import StreamedDataset, load_streamed_data, source_shards

# ---------------------------------------------------------------- a run


def make_accelerator(recipe: Recipe, output_dir: Path) -> Accelerator:
    """One Accelerator for the run (mixed precision, trackers, DDP options come from the first stage)."""
    config = recipe.stages[0].train
    precision = config.mixed_precision
    notes = []
    if precision == "fp16" and not torch.cuda.is_available():
        precision = "no"
        notes.append("fp16 mixed precision needs a GPU; training in float32 (bf16 works on CPUs)")
    tracker, note = tracker_for(config.log_with)
    notes += [note] if note else []
    check_deepspeed_launch(torch.cuda.is_available())
    accelerator = plain_accelerator(
        precision,
        log_with=tracker,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=config.ddp_find_unused_parameters)],
    )
    enable_fsdp2(accelerator)
    if accelerator.distributed_type.value == "DEEPSPEED" and any(s.train.grad_accum > 1 for s in recipe.stages):
        raise ValueError("under DeepSpeed set train.grad_accum: 1 and raise train.batch_size instead")
    for note in notes:
        if accelerator.is_main_process:
            tqdm.write(f"note: {note}")
    return accelerator


def plain_accelerator(precision: str = "no", **kwargs: Any) -> Accelerator:
    """An Accelerator in this process's one mixed precision."""
    check_one_precision_per_process(precision)
    # Without cpu=True accelerate does not see torchrun's processes on a machine without an accelerator.
    return Accelerator(mixed_precision=precision, cpu=not has_accelerator_device(), **kwargs)


def check_one_precision_per_process(precision: str) -> None:
    """accelerate keeps one AcceleratorState per process and cannot start over with another mixed
    precision (it has no public reset); say so in the recipe's words instead of its "restart your runtime"."""
    if not is_initialized():
        return
    state = AcceleratorState()
    if state.distributed_type != DistributedType.DEEPSPEED and state.mixed_precision != precision:
        raise ValueError(
            f"train.mixed_precision: this process already trained in {state.mixed_precision!r} and accelerate "
            f"allows one precision per process; run the {precision!r} training in a new process"
        )


def has_accelerator_device() -> bool:
    if hasattr(torch, "accelerator"):
        return torch.accelerator.is_available()
    return torch.cuda.is_available()  # pragma: no cover - torch < 2.6


def check_input_paths(recipe: Recipe, *, model_given: bool, tokenizer_given: bool) -> None:
    """Refuse a path that cannot work (a built-in recipe's placeholder, a typo) before anything heavy
    loads, naming the recipe key to set; a given model or tokenizer needs no path."""
    if not model_given:
        check_base_path(recipe.model.base)
    if not tokenizer_given:
        check_tokenizer_path(recipe.model)
    check_data_paths(recipe)


def check_base_path(base: str) -> None:
    """A preset or a folder (Hugging Face or Meta layout); anything else would reach transformers as a hub id."""
    if not is_preset(base) and not Path(base).is_dir():
        raise FileNotFoundError(
            f"model.base: {base} is neither a preset ({', '.join(sorted(BASE_PRESETS))}) nor a folder; "
            "set it to the base model folder (--set model.base=PATH)"
        )


def check_tokenizer_path(section: ModelSection) -> None:
    """The tokenizer folder is `model.tokenizer`, else the base folder (a preset has none)."""
    folder = section.tokenizer or section.base
    if is_preset(folder):
        raise ValueError(
            f"model.tokenizer: base {folder!r} is a preset without a tokenizer; "
            "set a tokenizer folder (--set model.tokenizer=PATH)"
        )
    if not Path(folder).is_dir():
        shown = folder if section.tokenizer else f"{folder} (model.base: model.tokenizer is not set)"
        raise FileNotFoundError(
            f"model.tokenizer: {shown} is not a folder; set it to the tokenizer folder (--set model.tokenizer=PATH)"
        )


def check_data_paths(recipe: Recipe) -> None:
    """Every data file of every stage exists (keys as `--set` takes them: stages.N. only in multi-stage runs)."""
    for i, stage in enumerate(recipe.stages):
        prefix = f"stages.{i}." if len(recipe.stages) > 1 else ""
        sources = [("train", j, s) for j, s in enumerate(stage.data.train)]
        sources += [("eval", j, s) for j, s in enumerate(stage.data.eval)]
        for split, j, source in sources:
            key = f"{prefix}data.{split}.{j}.path"
            if split == "train" and stage.data.streaming:
                if not source_shards(source):
                    raise FileNotFoundError(
                        f"{key}: {source.path} holds no data shards (*.jsonl, *.json, *.parquet, *.tar); set it to "
                        f"a shard file, a folder of shards or a glob (--set {key}=PATH)"
                    )
            elif not Path(source.path).is_file():
                problem = "is a folder, not a data file" if Path(source.path).is_dir() else "not found"
                raise FileNotFoundError(f"{key}: {source.path} {problem}; set it to the data file (--set {key}=PATH)")


def build_model(recipe: Recipe, model: nn.Module | None, tokenizer: Any) -> tuple[nn.Module, Any]:
    """The base model with the recipe's adapter attached (or `init_from`'s weights), and its tokenizer
    (paths checked by `check_input_paths`)."""
    section = recipe.model
    # The adapter's options are checked before the base loads (minutes for a 7B); the fit to the base after.
    config = _adapter_config(recipe) if getattr(model, "adapter_config", None) is None else None
    if tokenizer is None:
        tokenizer = load_tokenizer(section.tokenizer or section.base)
    if model is None:
        device = "cpu"
        if section.quantization is not None:  # quantized while loading, straight onto this process's device
            device = PartialState().device
            check_quantization(section.quantization, device, "model.quantization")
        model = load_base_model(
            section.base,
            dtype=section.dtype,
            device=device,
            attn_implementation=section.attn_implementation,
            quantization=section.quantization,
        )
    if config is not None:
        attach_adapter(model, config)
        if recipe.adapter.init_from:
            load_adapter_weights(model, recipe.adapter.init_from)
    elif adapter_config_of(model).method != recipe.adapter.method:
        raise ValueError(
            f"adapter.method is {recipe.adapter.method!r} but the given model carries {adapter_config_of(model).method!r}"
        )
    return model, tokenizer


def _adapter_config(recipe: Recipe) -> Any:
    try:
        return make_config(recipe.adapter.method, recipe.adapter.preset, **recipe.adapter.options)
    except (TypeError, ValueError) as error:
        raise ValueError(f"adapter: {error}") from error


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's padding token, else its EOS token, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate
    return 0  # pragma: no cover


# ---------------------------------------------------------------- a stage


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A stage's optimizer steps and learning rate."""

    total_steps: int
    per_epoch: int | None
    """None for a streamed stage (no length up front)."""
    warmup: int
    global_batch: int
    peak_lr: float


@dataclasses.dataclass
class StageSetup:
    """What one stage trains with."""

    route: OneBackward | BackwardPerKind | ForwardPerKind
    report: dict[str, Any]
    dataset: SupervisedDataset | StreamedDataset
    eval_set: SupervisedDataset | None
    bad: BadSampleLog
    collate: Collator
    schedule: Schedule
    loss_module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler


def setup_stage(run: Run, stage: StageSection, resume_state: ResumeState | None) -> StageSetup:
    """Build a stage, in this order: what trains, data, schedule, optimizer, then the checkpoint's state
    (restored last: it sets the RNG, which nothing may draw from afterwards)."""
    accelerator = run.accelerator
    kinds = sample_kinds(stage.data.train, stage.trains)
    params_by_kind = select_trainable(run.model, kinds)
    set_gradient_checkpointing(run.model, stage.train.gradient_checkpointing)
    report = stage_report(run.model, kinds)
    run.print(format_report(report))
    if len(kinds) > 1 and accelerator.distributed_type.value == "DEEPSPEED":
        raise ValueError(f"stage {stage.name!r}: mixed data kinds need one process, DDP or FSDP2, not DeepSpeed")
    sharded = is_fsdp2(accelerator)
    if sharded:  # the first stage shards the model; its parameters are shards from here on
        if run.sharded_loss is None:
            run.sharded_loss = shard_loss_module(accelerator, TokenLoss(run.model))
            run.print(f"FSDP2: the model is sharded over {accelerator.num_processes} processes")
        params_by_kind = {kind: list(trainable_parameters(run.model, kind).values()) for kind in kinds}
    route = backward_for(params_by_kind, sharded=sharded)
    if stage.data.streaming:
        dataset, eval_set, bad = load_streamed_data(run, stage, kinds, pad_token_id(run.tokenizer))
    else:
        dataset, eval_set, bad = load_stage_data(run, stage, kinds)
    collate = Collator(pad_token_id=pad_token_id(run.tokenizer))
    schedule = plan_schedule(stage, dataset, accelerator.num_processes)
    both = stage.train.lr is not None and stage.train.base_lr is not None
    run.print(
        f"schedule: {schedule.total_steps} steps "
        f"({'streamed' if schedule.per_epoch is None else f'{schedule.per_epoch} per epoch'}), global batch "
        f"{schedule.global_batch}, peak lr {schedule.peak_lr:.4g}{' (train.lr; base_lr is not used)' if both else ''} "
        f"({stage.train.schedule}, {schedule.warmup} warmup steps), weight decay {stage.train.weight_decay}"
    )
    optimizer, scheduler = make_optimizer(run.model, kinds, stage.train, schedule)
    accelerator.free_memory()
    if sharded:  # the model is sharded already; accelerate's prepare() would shard it again
        loss_module, optimizer = run.sharded_loss, accelerator.prepare_optimizer(optimizer)
    else:
        set_deepspeed_micro_batch(accelerator, stage.train.batch_size)
        loss_module, optimizer = accelerator.prepare(TokenLoss(run.model), optimizer)
    if resume_state is not None:
        note = restore_training_state(accelerator, run.model, optimizer, scheduler, *resume_state)
        if note is not None:
            run.print(note)
    return StageSetup(route, report, dataset, eval_set, bad, collate, schedule, loss_module, optimizer, scheduler)


def select_trainable(model: nn.Module, kinds: list[str | None]) -> dict[str | None, list[nn.Parameter]]:
    """Freeze everything but the selector's parameters of every kind of data in the stage; by kind."""
    params_by_kind = {kind: list(trainable_parameters(model, kind).values()) for kind in kinds}
    model.requires_grad_(False)
    for params in params_by_kind.values():
        for param in params:
            param.requires_grad_(True)
    return params_by_kind


def set_gradient_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Turn activation checkpointing of the decoder layers on or off for a stage (train.gradient_checkpointing).

    Non-reentrant checkpointing sends gradients to every tensor a replayed layer uses, keyword arguments (V2's
    visual prompt) and module parameters (prompts, gates, bias/scale, LoRA) included, so the frozen embedding's
    output need not require grad: transformers' input hook is removed again, and the frozen layers below the
    first trainable parameter stay out of the backward pass.
    """
    if not enabled:
        if getattr(model, "supports_gradient_checkpointing", False):
            model.activation_checkpointing_disable()
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"train.gradient_checkpointing: {type(model).__name__} does not support activation checkpointing; "
            "set it to false"
        )
    model.activation_checkpointing_enable({"use_reentrant": False})
    model.disable_input_require_grads()


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


def load_stage_data(
    run: Run, stage: StageSection, kinds: list[str | None]
) -> tuple[SupervisedDataset, SupervisedDataset | None, BadSampleLog]:
    """(training set, eval set or None, bad-sample log) of a stage, images checked or cached up front.

    Every row is read, validated and tokenized now, its token ids checked against the base model's
    embedding and its image's header read; images decode per batch.
    """
    accelerator, data = run.accelerator, stage.data
    bad = BadSampleLog(data.on_bad_sample, data.max_bad_fraction)
    show = accelerator.is_local_main_process
    samples = load_samples(data.train, run.tokenizer, data, kinds, stage.trains, bad, show_progress=show)
    eval_samples = samples[: data.eval_from_train]
    if data.eval:
        eval_samples += load_samples(data.eval, run.tokenizer, data, kinds, stage.trains, bad, show_progress=show)
    rows = run.model.get_input_embeddings().weight.shape[0]  # peft wraps a LoRA-tuned embedding
    check_token_ids(samples + eval_samples, run.tokenizer, pad_token_id(run.tokenizer), rows)
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
    run.print(
        f"first sample ({samples[0].source}), trained tokens in [[ ]]:\n{supervised_view(run.tokenizer, samples[0])}"
    )
    dataset = SupervisedDataset(samples, loader, seed=stage.train.seed)
    return dataset, (SupervisedDataset(eval_samples, eval_loader) if eval_samples else None), bad


def plan_schedule(stage: StageSection, dataset: SupervisedDataset | StreamedDataset, processes: int) -> Schedule:
    """Optimizer steps from epochs (or max_steps, which a streamed stage needs); LR from lr, or base_lr x global
    batch / 256."""
    config = stage.train
    per_epoch = None if isinstance(dataset, StreamedDataset) else epoch_steps(stage, dataset, processes)
    global_batch = config.batch_size * config.grad_accum * processes
    return Schedule(
        total_steps=config.max_steps or math.ceil(config.epochs * per_epoch),
        per_epoch=per_epoch,
        warmup=config.warmup_steps
        if config.warmup_steps is not None
        else round(config.warmup_epochs * (per_epoch or 0)),
        global_batch=global_batch,
        peak_lr=config.lr if config.lr is not None else config.base_lr * global_batch / 256,
    )


def epoch_steps(stage: StageSection, dataset: SupervisedDataset, processes: int) -> int:
    """Optimizer steps in one epoch of an in-memory stage."""
    config = stage.train
    plan = dict(batch_size=config.batch_size, grad_accum=config.grad_accum, num_processes=processes)
    micro_per_epoch = len(epoch_batches(dataset.lengths(), seed=0, epoch=0, group_by_length=False, **plan)) // processes
    if micro_per_epoch == 0:
        raise DataError(f"stage {stage.name!r}: {len(dataset)} samples make less than one batch per process")
    return steps_per_epoch(micro_per_epoch, config.grad_accum)


def make_optimizer(
    model: nn.Module, kinds: list[str | None], config: TrainSection, schedule: Schedule
) -> tuple[torch.optim.Optimizer, LRScheduler]:
    """AdamW with the official grouping (no decay on 1-D tensors and biases), and its LR schedule."""
    groups = [g for kind in kinds for g in optimizer_param_groups(model, config.weight_decay, kind) if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=schedule.peak_lr, betas=config.betas, eps=config.eps)
    scheduler = make_scheduler(
        optimizer,
        peak=schedule.peak_lr,
        total=schedule.total_steps,
        warmup=schedule.warmup,
        schedule=config.schedule,
        min_lr=config.min_lr,
    )
    return optimizer, scheduler
