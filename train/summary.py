"""What a run reports: log records every `log_every` steps, stage and run summaries, and the saved
adapter with its training_summary.json and loss curve.

The keys of these records are read by the tests, the summary JSON and the loss curve: keep them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmadapter.adapters.io.checkpoint import save_adapter
from mmadapter.adapters.methods.base import adapter_config_of
from mmadapter.core.templates import template_record
from mmadapter.train.checkpointing import gathered_adapter
from mmadapter.train.data import BadSampleLog
from mmadapter.train.recipe import StageSection
from mmadapter.train.reporting import CURVE_FILE, plot_loss_curve, write_summary
from mmadapter.train.state import Progress, Run
from mmadapter.train.step import StepStats


class Window:
    """Sums between two log lines: response-token loss, tokens and time."""

    def __init__(self) -> None:
        self.loss = self.count = self.tokens = self.seconds = 0.0

    def add(self, stats: StepStats, seconds: float) -> None:
        self.loss += stats.loss_sum
        self.count += stats.response_tokens
        self.tokens += stats.tokens
        self.seconds += seconds

    def record(self, stage: str, progress: Progress, lr: float, grad_norm: float | None) -> dict[str, Any]:
        """The log record of the window so far; the window starts again empty."""
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


def log(run: Run, record: dict[str, Any]) -> None:
    """Send a record to the trackers (numbers, under the stage's name) and to the caller's `on_log`."""
    numbers = {k: v for k, v in record.items() if isinstance(v, int | float) and k not in ("step", "global_step")}
    run.accelerator.log({f"{record['stage']}/{k}": v for k, v in numbers.items()}, step=record["global_step"])
    if run.on_log is not None and run.accelerator.is_main_process:
        run.on_log(dict(record))


def stage_summary(stage: StageSection, progress: Progress, report: dict[str, Any], bad: BadSampleLog) -> dict[str, Any]:
    """A finished stage: totals, best and final losses, parameters, bad samples and its whole history."""
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
    record = template_record(template, run.tokenizer)
    save_adapter(run.model, directory, training=run.recipe.to_dict(), state_dict=adapter, **record)
    write_summary(summary, directory)
    message = plot_loss_curve(stages, directory / CURVE_FILE, title=run.recipe.name)
    if message:
        run.print(f"note: {message}")
