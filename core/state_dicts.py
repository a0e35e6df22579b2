"""Whether a state dict fits a module, said in one short line.

torch's own error for `load_state_dict` lists every missing and unexpected key on one line: tens of kilobytes
for a checkpoint of another architecture, which buries what a user needs (how many, two examples).
"""

from __future__ import annotations

import torch
from torch import nn


def check_fits(module: nn.Module, state: dict[str, torch.Tensor], what: str, advice: str = "") -> None:
    """A ValueError `what: N missing (e.g. …); N unexpected (e.g. …); N of another shape (e.g. …)` unless every
    key of `module` is in `state` with its shape and nothing else is; `advice` says what to do instead."""
    expected = {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    reshaped = sorted(
        f"{key} {tuple(state[key].shape)} for {expected[key]}"
        for key in expected.keys() & state.keys()
        if tuple(state[key].shape) != expected[key]
    )
    groups = (("missing", missing), ("unexpected", unexpected), ("of another shape", reshaped))
    problems = [f"{len(keys)} {kind} (e.g. {', '.join(keys[:2])})" for kind, keys in groups if keys]
    if problems:
        raise ValueError(f"{what}: {'; '.join(problems)}" + (f"; {advice}" if advice else ""))
