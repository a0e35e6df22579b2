"""What a training run holds (`Run`), where it is (`Progress`, saved in every checkpoint) and how it
ends (`TrainResult`, or `TrainingStopped`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from mmadapter.train.recipe import Recipe


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
    stream: dict[str, Any] | None = None
    """A streamed stage's data position after the last step (train/streaming.py `StreamState`)."""
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)
    evals: list[dict[str, float]] = dataclasses.field(default_factory=list)
    finished_stages: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def step_done(self, epoch: int, micro_batch: int, tokens: float, seconds: float) -> None:
        """Count one optimizer step that ended at micro-batch `micro_batch` of `epoch`."""
        self.step += 1
        self.global_step += 1
        self.epoch, self.micro_batch = epoch, micro_batch
        self.tokens += int(tokens)
        self.wall_time += seconds

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
    accelerator: Accelerator
    model: nn.Module
    tokenizer: Any
    output_dir: Path
    on_log: Callable[[dict[str, Any]], None] | None
    sharded_loss: nn.Module | None = None
    """Under FSDP2: the loss module around `model`, sharded by the first stage and used by every stage."""

    def print(self, *args: Any) -> None:
        """A message from the main process only, above the progress bar."""
        if self.accelerator.is_main_process:
            tqdm.write(" ".join(str(a) for a in args))
