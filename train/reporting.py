"""What a run tells its user: TensorBoard scalars, the end-of-run loss curve and JSON summary.

TensorBoard goes through accelerate's trackers and is optional at run time: without the package
the run says so once and goes on. The loss curve is drawn with matplotlib's Agg backend (no
display needed), also optional.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from accelerate.utils import is_tensorboard_available

from mmadapter.core.files import atomic_write_bytes

SUMMARY_FILE = "training_summary.json"
CURVE_FILE = "loss_curve.png"


def tracker_for(log_with: str) -> tuple[str | None, str | None]:
    """(accelerate tracker name or None, a message for the user or None)."""
    if log_with == "none":
        return None, None
    if not is_tensorboard_available():
        return None, "tensorboard is not installed, so nothing is logged to TensorBoard (pip install tensorboard)"
    return "tensorboard", None


def flat_hparams(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested recipe -> {"stages.0.train.lr": 0.001, …} with TensorBoard-compatible values."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_hparams(value, f"{name}."))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, item in enumerate(value):
                flat.update(flat_hparams(item, f"{name}.{i}."))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def plot_loss_curve(stages: list[dict[str, Any]], path: Path, title: str) -> str | None:
    """Training (and eval) loss over optimizer steps, one colour per stage; returns a message instead
    when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        return "matplotlib is not installed, so no loss curve is drawn (pip install matplotlib)"
    figure, axes = pyplot.subplots(figsize=(7, 4), dpi=100)
    for stage in stages:
        history, evals = stage["history"], stage["evals"]
        label = stage["stage"]
        history = [h for h in history if h["loss"] is not None]
        if history:
            axes.plot([h["global_step"] for h in history], [h["loss"] for h in history], label=f"{label} train")
        if evals:
            axes.plot([e["global_step"] for e in evals], [e["eval_loss"] for e in evals], "o--", label=f"{label} eval")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss per response token")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)
    return None


def write_summary(summary: dict[str, Any], directory: Path) -> Path:
    path = directory / SUMMARY_FILE
    atomic_write_bytes(path, (json.dumps(summary, indent=2) + "\n").encode())
    return path
