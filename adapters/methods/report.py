"""Parameter reports: total, trainable and per-group counts of an adapted model.

Used by `mmadapter info` (on the meta device, so a 65B report allocates nothing) and printed by
the training loop at start.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from torch import nn

from mmadapter.adapters.backbones.quantization import parameter_count
from mmadapter.adapters.methods.base import adapter_config_of, trainable_parameters

_LAYER_INDEX = re.compile(r"\.\d+\.")


def parameter_group(name: str) -> str:
    """`model.layers.7.self_attn.adapter_gate` -> `model.layers.*.self_attn.adapter_gate`."""
    return _LAYER_INDEX.sub(".*.", name)


def parameter_report(model: nn.Module, stage: str | None = None) -> dict[str, Any]:
    config = adapter_config_of(model)
    trainable = trainable_parameters(model, stage)
    total = sum(parameter_count(p) for p in model.parameters())  # a 4-bit weight's real size, not its bytes
    count = sum(p.numel() for p in trainable.values())
    groups = Counter()
    for name, param in trainable.items():
        groups[parameter_group(name)] += param.numel()
    return {
        "method": config.method,
        "stage": stage,
        "total_params": total,
        "trainable_params": count,
        "trainable_fraction": count / total if total else 0.0,
        "groups": dict(sorted(groups.items())),
    }


def format_report(report: dict[str, Any]) -> str:
    """A human-readable table of a `parameter_report`."""
    lines = [
        f"method      {report['method']}" + (f" (stage: {report['stage']})" if report.get("stage") else ""),
        f"total       {report['total_params']:>15,}",
        f"trainable   {report['trainable_params']:>15,}  ({100 * report['trainable_fraction']:.4f}% of the total)",
    ]
    if report["groups"]:
        lines.append("trainable groups:")
        width = max(len(g) for g in report["groups"])
        lines += [f"  {group:<{width}}  {n:>13,}" for group, n in report["groups"].items()]
    return "\n".join(lines)
