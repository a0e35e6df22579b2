"""What the demo leaves behind for people: an accuracy chart, a model card (README.md) and its figures as tables."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from mmadapter.cli.demo.world import ATTRIBUTES


def plot_accuracy(untrained: dict[str, Any], trained: dict[str, Any], path: Path) -> str | None:
    """Grouped bars: held-out accuracy per attribute, untrained vs trained, captions and answers side by side.

    Returns a message instead of drawing when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        return "matplotlib is not installed, so no accuracy chart is drawn (pip install matplotlib)"
    figure, axes = pyplot.subplots(1, 2, figsize=(9, 3.5), dpi=100, sharey=True)
    for axis, kind, title in zip(axes, ("caption", "answer"), ("in generated captions", "in answers"), strict=True):
        names = [a for a in ATTRIBUTES if a in trained[kind]]
        positions = range(len(names))
        axis.bar([p - 0.2 for p in positions], [untrained[kind][a] for a in names], 0.4, label="untrained")
        axis.bar([p + 0.2 for p in positions], [trained[kind][a] for a in names], 0.4, label="trained")
        axis.set_xticks(list(positions), names)
        axis.set_title(f"held-out accuracy {title}")
        axis.set_ylim(0, 1)
        axis.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="upper center", ncol=2, frameon=False)
    figure.tight_layout(rect=(0, 0, 1, 0.9))
    figure.savefig(path)
    pyplot.close(figure)
    return None


#: Columns of the accuracy table (model card, `results.json`, bench/results/demo.json, the README).
ACCURACY_COLUMNS = (
    "held-out accuracy",
    "untrained (captions)",
    "trained (captions)",
    "untrained (answers)",
    "trained (answers)",
)


def _percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f} %"


def accuracy_table(untrained: dict[str, Any], trained: dict[str, Any]) -> dict[str, list]:
    """Held-out accuracy per attribute as {"columns", "rows"} of strings: the layout the docs render from JSON."""
    rows = []
    for attribute in ATTRIBUTES:
        label = "position (single shapes)" if attribute == "position" else attribute
        cells = [
            _percent(result[kind].get(attribute)) for kind in ("caption", "answer") for result in (untrained, trained)
        ]
        rows.append([label, *cells])
    return {"columns": list(ACCURACY_COLUMNS), "rows": rows}


def time_table(steps: dict[str, dict[str, float]]) -> dict[str, list]:
    """Wall and CPU seconds of each step of the demo, and their total."""
    rows = [[what, f"{t['wall_seconds']:.0f}", f"{t['cpu_seconds']:.0f}"] for what, t in steps.items()]
    total = [sum(t[key] for t in steps.values()) for key in ("wall_seconds", "cpu_seconds")]
    rows.append(["total", f"{total[0]:.0f}", f"{total[1]:.0f}"])
    return {"columns": ["step", "wall s", "CPU s"], "rows": rows}


def markdown_table(table: dict[str, list]) -> list[str]:
    """A table as markdown lines: the first column left-aligned, the others right-aligned."""
    columns = table["columns"]
    lines = ["| " + " | ".join(columns) + " |", "| --- |" + " ---: |" * (len(columns) - 1)]
    return lines + ["| " + " | ".join(row) + " |" for row in table["rows"]]


def results_document(metrics: dict[str, Any], command: str) -> dict[str, Any]:
    """The run's figures in bench/results' layout ({"tables": …}), to commit as bench/results/demo.json."""
    return {
        "date": time.strftime("%Y-%m-%d"),
        "command": command,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": metrics["threads"],
            "load_average_at_end": [round(load, 2) for load in os.getloadavg()],
        },
        "scale": metrics["scale"],
        "wall_time_seconds": metrics["wall_time_seconds"],
        "cpu_time_seconds": metrics["cpu_time_seconds"],
        "tables": {
            "accuracy": accuracy_table(metrics["untrained"], metrics["trained"]),
            "time": time_table(metrics["steps"]),
        },
    }


def write_model_card(output: Path, metrics: dict[str, Any], assets: Path, summary: dict[str, Any]) -> Path:
    """README.md in the demo folder: what was trained, on what, how well, and how to use it."""
    adapter = Path(metrics["adapter"])
    scale = metrics["scale"]
    parameters = summary.get("stages", [{}])
    stage_lines = [
        f"- **{s['stage']}** stage: {s['steps']} steps, {s['parameters']['trainable_params']:,} trainable "
        f"parameters, final loss {s['final_loss']:.3f}, {s['wall_time_seconds']:.0f} s"
        for s in parameters
        if "parameters" in s
    ]
    config = json.loads((adapter / "mmadapter_config.json").read_text())["adapter"]
    text = "\n".join(
        [
            "---",
            "library_name: mmadapter",
            "tags: [llama-adapter-v2, multimodal, demo, synthetic-data]",
            "---",
            "",
            "# mmadapter demo: LLaMA-Adapter V2 on a tiny frozen LLaMA",
            "",
            "A **LLaMA-Adapter V2** adapter (Gao et al., 2023, arXiv:2304.15010) trained by `mmadapter demo` on a "
            "synthetic world of coloured shapes. The base model (`tiny-llama`, pretrained on the world's text "
            "only) and the CLIP vision tower (`tiny-clip`) stay frozen; only the adapter trained.",
            "",
            "## Training",
            "",
            f"- data: {scale['train_images']} training images with captions and "
            f"{scale['questions_per_image']} questions each, plus text-only instructions; "
            f"{scale['heldout_images']} held-out images for evaluation (the split is by image)",
            *stage_lines,
            f"- total: {metrics['wall_time_seconds']:.0f} s wall, {metrics['cpu_time_seconds']:.0f} s CPU, "
            f"{metrics['threads']} thread(s)",
            "",
            "## Held-out accuracy",
            "",
            "How often a generated caption or answer names the attribute correctly "
            "(greedy decoding, attributes read from the words):",
            "",
            *markdown_table(accuracy_table(metrics["untrained"], metrics["trained"])),
            "",
            "## Adapter settings",
            "",
            "```json",
            json.dumps(config, indent=2),
            "```",
            "",
            "## Use it",
            "",
            "```bash",
            f"mmadapter chat --base {assets / 'tiny-llama'} --adapter {adapter} --image IMAGE.png",
            f"mmadapter serve --base {assets / 'tiny-llama'} --adapter {adapter} --ui",
            "```",
            "",
            "## Files",
            "",
            "- `adapter/`: the adapter (`adapter_model.safetensors`, `mmadapter_config.json`), training summary",
            "- `metrics.json`: held-out accuracy before and after training, timings, example conversations",
            "- `results.json`: the accuracy and time tables (the layout of the repository's bench/results/demo.json)",
            "- `loss_curves.png`, `accuracy.png`: training loss per stage; accuracy before/after",
            "- `examples/`: held-out example images with questions (the web UI's examples)",
            "- `data/`: the generated training files; `clip-cache/`: cached CLIP features",
            "",
        ]
    )
    path = output / "README.md"
    path.write_text(text)
    return path
