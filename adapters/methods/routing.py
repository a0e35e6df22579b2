"""Several adapters on one frozen base, chosen per batch row, each at its own strength.

Serving many adapters from one base keeps one copy of the large weights. Each adapter is attached
to a *shell*: a copy of the base model's module tree whose weight matrices are the base's own
tensors (only 1-D parameters, e.g. norm weights that V2 trains, are copied), so loading, checking
and attaching reuse the one-adapter code unchanged. The base model then routes rows to the shells:

* a module that an adapter changes (a V2 bias/scale linear, a peft LoRA layer, a trained norm) gets
  a routing forward on the base: rows of adapter A are computed by A's module in the shell, the
  other rows by the base module. Rows of one adapter go through exactly the code they would alone.
* LLaMA-Adapter prompts are added inside the attention function (`prompt_attention`), per group of
  rows, from the shell's prompt and gate.

A request's strength r in [0, 1] (`adapter_scale`) scales what the adapter adds: gates g -> r·g,
bias b -> r·b, scale s -> 1 + r·(s - 1), LoRA's alpha/r -> r·alpha/r, a trained parameter p ->
p0 + r·(p - p0). r = 0 rows are routed to the base itself, so they equal the base model exactly.

The routing of the current forward is a context variable (`routed(routing)`), set by the caller
around a forward; without one the base runs as the plain base model.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
from collections.abc import Callable, Iterator

import torch
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.func import functional_call

from mmadapter.adapters.methods.bias_scale import bias_scale_state
from mmadapter.adapters.methods.strength import current_strength, strength

#: Attribute on a base module: adapter name -> the shell's version of that module.
ROUTES_ATTRIBUTE = "adapter_routes"
#: Attribute on a base attention module: adapter name -> the shell's attention module carrying prompts.
PROMPT_ROUTES_ATTRIBUTE = "adapter_prompt_routes"
_PROMPT_PARAMETERS = ("adapter_prompt", "adapter_gate")


@dataclasses.dataclass(frozen=True, eq=False)
class RowGroup:
    """Rows of a batch that use one adapter at one strength."""

    adapter: str
    strength: float
    rows: torch.Tensor
    """Row indices (long, on the model's device)."""
    whole_batch: bool
    visual_prompt: torch.Tensor | None = None
    """(rows, K, D): the group's visual prompts (zeros for rows without a picture), or None."""


@dataclasses.dataclass(frozen=True, eq=False)
class RowRouting:
    """Which adapter, at which strength, each row of the current forward uses (rows not in a group: the base)."""

    batch_size: int
    groups: tuple[RowGroup, ...]

    @classmethod
    def build(
        cls,
        adapters: list[str | None],
        strengths: list[float],
        device: torch.device,
        visual_prompts: list[torch.Tensor | None] | None = None,
    ) -> RowRouting:
        """Group rows by (adapter, strength); None adapters and strength 0 stay on the base."""
        visual_prompts = visual_prompts or [None] * len(adapters)
        keys: dict[tuple[str, float], list[int]] = {}
        for row, (adapter, value) in enumerate(zip(adapters, strengths, strict=True)):
            if adapter is not None and value != 0.0:
                keys.setdefault((adapter, float(value)), []).append(row)
        groups = []
        for (adapter, value), rows in keys.items():
            prompts = [visual_prompts[row] for row in rows]
            stacked = None
            if any(p is not None for p in prompts):
                like = next(p for p in prompts if p is not None)
                stacked = torch.cat([like.new_zeros(like.shape) if p is None else p for p in prompts])
            groups.append(
                RowGroup(
                    adapter,
                    value,
                    torch.tensor(rows, dtype=torch.long, device=device),
                    len(rows) == len(adapters),
                    stacked,
                )
            )
        return cls(len(adapters), tuple(groups))


_ROUTING: contextvars.ContextVar[RowRouting | None] = contextvars.ContextVar("mmadapter_routing", default=None)


def current_routing() -> RowRouting | None:
    return _ROUTING.get()


@contextlib.contextmanager
def routed(routing: RowRouting | None) -> Iterator[None]:
    """Run the forwards inside with `routing` (None: the plain base)."""
    token = _ROUTING.set(routing)
    try:
        yield
    finally:
        _ROUTING.reset(token)


def make_shell(base: nn.Module) -> nn.Module:
    """A copy of `base` sharing its weight matrices and buffers; 1-D parameters (norms, biases) are copies,
    so an adapter that trains them cannot change the base."""
    shared = {id(t): t for t in [*base.parameters(), *base.buffers()]}
    shell = copy.deepcopy(base, memo=shared)
    for module in shell.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.ndim <= 1:
                setattr(module, name, nn.Parameter(param.detach().clone(), requires_grad=False))
    return shell.eval()


def _changed(base: nn.Module, shell: nn.Module) -> bool:
    """Whether the shell's module computes something else than the base's (its own parameters only)."""
    if type(base) is not type(shell) or bias_scale_state(shell) is not None:
        return True
    own = dict(base.named_parameters(recurse=False))
    for name, param in shell.named_parameters(recurse=False):
        if name in _PROMPT_PARAMETERS:
            continue
        if name not in own or param.shape != own[name].shape or not torch.equal(param, own[name]):
            return True
    return False


def install_routes(base: nn.Module, name: str, shell: nn.Module) -> list[str]:
    """Let rows routed to adapter `name` use `shell`'s modules; returns the paths that got a routing forward."""
    if getattr(base, "adapter_config", None) is not None:
        raise ValueError("adapters are routed onto a plain base model; this one already carries an adapter")
    if any(getattr(m.get_decoder(), "prefix_encoder", None) is not None for m in (base, shell)):
        raise ValueError(
            f"adapter {name!r}: P-Tuning v2 prefixes live in each request's KV cache, which rows of other adapters "
            "share in a batch, so they cannot be routed per row; run the shell itself (serve.loader gives such an "
            "adapter its own engine)"
        )
    changed: list[str] = []
    skip: tuple[str, ...] = ()
    for path, module in base.named_modules():
        if path == "" or (skip and path.startswith(skip)):
            continue
        other = shell.get_submodule(path)
        if getattr(other, "adapter_prompt", None) is not None:
            _routes(module, PROMPT_ROUTES_ATTRIBUTE)[name] = other
        if _changed(module, other):
            _routes(module, ROUTES_ATTRIBUTE)[name] = other
            for layer in other.modules():
                if isinstance(layer, LoraLayer) and not isinstance(layer.scaling, _ScalingAtStrength):
                    layer.scaling = _ScalingAtStrength(layer.scaling)
            if getattr(module, "_mmadapter_routed", False) is False:
                module.forward = _routing_forward(module, module.forward)
                module._mmadapter_routed = True
            changed.append(path)
            skip = (*skip, path + ".")
    return changed


def _routes(module: nn.Module, attribute: str) -> dict[str, nn.Module]:
    routes = getattr(module, attribute, None)
    if routes is None:
        routes = {}
        object.__setattr__(module, attribute, routes)  # a plain dict, not submodules: the shells own them
    return routes


def _routing_forward(module: nn.Module, original: Callable) -> Callable:
    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        routing = current_routing()
        routes = getattr(module, ROUTES_ATTRIBUTE)
        groups = [] if routing is None else [g for g in routing.groups if g.adapter in routes]
        if not groups:
            return original(x, *args, **kwargs)
        if len(groups) == 1 and groups[0].whole_batch:
            return _run_shell(module, routes[groups[0].adapter], groups[0].strength, x, args, kwargs)
        parts = []
        covered = torch.cat([g.rows for g in groups])
        rest = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        rest[covered] = False
        if bool(rest.any()):
            rows = rest.nonzero().squeeze(1)
            parts.append((rows, original(x[rows], *args, **kwargs)))
        for group in groups:
            parts.append(
                (group.rows, _run_shell(module, routes[group.adapter], group.strength, x[group.rows], args, kwargs))
            )
        first = parts[0][1]
        output = first.new_empty((x.shape[0], *first.shape[1:]))
        for rows, value in parts:
            output[rows] = value
        return output

    return forward


def _run_shell(base: nn.Module, shell: nn.Module, value: float, x: torch.Tensor, args: tuple, kwargs: dict):
    if value == 1.0:
        return shell(x, *args, **kwargs)
    with strength(value):
        if isinstance(shell, LoraLayer) or bias_scale_state(shell) is not None:
            return shell(x, *args, **kwargs)
        # A module whose own parameters the adapter trained (a norm): p0 + r (p - p0).
        own = dict(base.named_parameters(recurse=False))
        blended = {
            name: own[name] + value * (param - own[name]) if name in own else param
            for name, param in shell.named_parameters(recurse=False)
        }
        return functional_call(shell, blended, (x, *args), kwargs)


class _ScalingAtStrength(dict):
    """peft's per-adapter LoRA `scaling` (alpha / r) as the layer reads it: times the current strength.

    A view rather than a temporary change of the numbers, so generation on another thread never sees them."""

    def __getitem__(self, key: str) -> float:
        value = super().__getitem__(key)
        factor = current_strength()
        return value if factor == 1.0 else value * factor
