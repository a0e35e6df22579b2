"""The contract every adapter method follows, and the one trainable-parameter selector.

A method is a config dataclass plus a class that does model surgery (peft's pattern). The
selector `AdapterMethod.is_trainable(name, config, stage)` is the single source of truth for
what trains: `mark_trainable`, `optimizer_param_groups` and `adapter_state_dict` all call it,
so freezing, optimisation and saving can never disagree.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from mmadapter.core.config import document_type, parse

#: Name of the plain-Python attribute that `attach_adapter` sets on the adapted model.
CONFIG_ATTRIBUTE = "adapter_config"


@document_type
@dataclasses.dataclass
class AdapterConfig:
    """Hyperparameters of one adapter method; subclasses add fields with docstrings."""

    method: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AdapterConfig:
        """Build a config from JSON or a recipe's options, checked like a recipe: unknown keys and wrong
        types are named by field."""
        values = {k: v for k, v in values.items() if k != "method"}
        return parse(cls, values, key_name=f"{cls.method} config field")


class AdapterMethod:
    """Model surgery for one method. Subclasses are registered with `register_method`."""

    name: ClassVar[str]
    config_class: ClassVar[type[AdapterConfig]]
    #: Named configurations, e.g. the released models' settings.
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    #: Training stages the selector understands (empty: the method has one stage).
    stages: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def attach(cls, model: nn.Module, config: AdapterConfig) -> None:
        """Add the method's parameters to `model` in place; outputs must not change."""
        raise NotImplementedError

    @classmethod
    def is_trainable(cls, name: str, config: AdapterConfig, stage: str | None = None) -> bool:
        """Whether parameter `name` trains in `stage` (None: in any stage, i.e. is saved)."""
        raise NotImplementedError

    @classmethod
    def saved_key(cls, name: str, config: AdapterConfig) -> str:
        """Key under which parameter `name` is saved (LoRA uses peft's names; default: unchanged)."""
        return name

    @classmethod
    def model_key(cls, key: str, config: AdapterConfig) -> str:
        """Inverse of `saved_key`."""
        return key

    @classmethod
    def write_extra_files(cls, model: nn.Module, config: AdapterConfig, directory: Path) -> None:
        """Extra files an adapter folder needs (e.g. peft's adapter_config.json); default none."""

    @classmethod
    def merge(cls, model: nn.Module, config: AdapterConfig, *, keep_originals: bool = True) -> None:
        """Fold what can be folded into the base weights for serving (default: nothing).

        `keep_originals=False` skips the copies an exact `unmerge` needs (serving never unmerges)."""

    @classmethod
    def unmerge(cls, model: nn.Module, config: AdapterConfig) -> None:
        """Undo `merge` exactly (default: nothing)."""


_METHODS: dict[str, type[AdapterMethod]] = {}


def register_method(method: type[AdapterMethod]) -> type[AdapterMethod]:
    """Class decorator that makes a method available by its name (`llama-adapter-v1`, …)."""
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> type[AdapterMethod]:
    if name not in _METHODS:
        raise ValueError(f"unknown adapter method {name!r}; available: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def available_methods() -> list[str]:
    return sorted(_METHODS)


def config_from_dict(values: dict[str, Any]) -> AdapterConfig:
    """Rebuild any method's config from its `to_dict()` form."""
    if "method" not in values:
        raise ValueError("adapter config has no 'method' field")
    return get_method(values["method"]).config_class.from_dict(values)


def make_config(method: str, preset: str | None = None, **overrides: Any) -> AdapterConfig:
    """A method's config from its defaults, an optional named preset, then explicit overrides."""
    cls = get_method(method)
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in cls.presets:
            raise ValueError(
                f"{method} has no preset {preset!r}; available: {', '.join(sorted(cls.presets)) or 'none'}"
            )
        values.update(cls.presets[preset])
    values.update(overrides)
    return cls.config_class.from_dict(values)


def attach_adapter(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Attach `config`'s method to `model` in place and remember the config on the model."""
    if getattr(model, CONFIG_ATTRIBUTE, None) is not None:
        raise ValueError("this model already carries an adapter; load a fresh base model to attach another")
    get_method(config.method).attach(model, config)
    # New submodules (peft's LoRA dropout, prefix dropout) start in train mode: follow the model's mode.
    model.train(model.training)
    setattr(model, CONFIG_ATTRIBUTE, config)
    return model


def adapter_config_of(model: nn.Module) -> AdapterConfig:
    config = getattr(model, CONFIG_ATTRIBUTE, None)
    if config is None:
        raise ValueError("this model has no adapter attached (use attach_adapter or load_adapter first)")
    return config


def _check_stage(config: AdapterConfig, stage: str | None) -> None:
    stages = get_method(config.method).stages
    if stage is not None and stage not in stages:
        allowed = ", ".join(stages) if stages else "none (it trains in one stage)"
        raise ValueError(f"{config.method} has no training stage {stage!r}; stages: {allowed}")


def trainable_parameters(model: nn.Module, stage: str | None = None) -> dict[str, nn.Parameter]:
    """The parameters that train in `stage`, by name: the one selector (DESIGN §3)."""
    config = adapter_config_of(model)
    _check_stage(config, stage)
    method = get_method(config.method)
    return {n: p for n, p in model.named_parameters() if method.is_trainable(n, config, stage)}


def mark_trainable(model: nn.Module, stage: str | None = None) -> dict[str, nn.Parameter]:
    """Freeze everything, then unfreeze exactly the selected parameters; returns them."""
    selected = trainable_parameters(model, stage)
    for param in model.parameters():
        param.requires_grad_(False)
    for param in selected.values():
        param.requires_grad_(True)
    return selected


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """The official grouping (timm's param_groups_weight_decay): no decay on 1-D tensors and biases."""
    return param.ndim <= 1 or name.endswith((".bias", "_bias"))


def optimizer_param_groups(model: nn.Module, weight_decay: float, stage: str | None = None) -> list[dict[str, Any]]:
    """AdamW groups over the selected parameters, split by the official weight-decay rule."""
    decay, no_decay = [], []
    for name, param in trainable_parameters(model, stage).items():
        (no_decay if no_weight_decay(name, param) else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything the adapter adds or unfreezes (all stages): what an adapter checkpoint holds."""
    return {name: param.detach() for name, param in trainable_parameters(model, None).items()}
