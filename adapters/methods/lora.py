"""LoRA through peft, saved in peft's folder layout so peft users can load mmadapter adapters.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685. The layers,
their zero-initialised B, dropout, scaling alpha/r and merging are peft's (`inject_adapter_in_model`);
this module only chooses targets per architecture (spec chatglm-6b-ptuning-v2 §6: ChatGLM-6B's fused
`query_key_value`, as peft and the LoRA projects cited by the official README do), names the saved
tensors as peft does (`base_model.model.<path>.lora_A.weight`, ecosystem-notes §2.3), and writes
peft's `adapter_config.json` beside mmadapter's own config.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Annotated, Any

import pydantic
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import cast_adapter_dtype
from peft.utils import NoMatchingPeftModuleError
from torch import nn

from mmadapter.adapters.backbones.quantization import is_quantized_linear
from mmadapter.adapters.methods.base import AdapterConfig, AdapterMethod, register_method
from mmadapter.core.config import Float, Int

#: model_type -> modules LoRA adapts when `target_modules` is None: the one table of defaults.
DEFAULT_TARGET_MODULES: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"),
    "chatglm": ("query_key_value",),
}

#: peft's adapter name; it is stripped from saved keys (`lora_A.default.weight` -> `lora_A.weight`).
ADAPTER_NAME = "default"
#: Prefix peft puts before module paths in its saved files (PeftModel -> LoraModel -> base model).
PEFT_KEY_PREFIX = "base_model.model."
_LORA_PARAMETER = re.compile(r"\.lora_(A|B|embedding_A|embedding_B)\.")
_NAMED_ADAPTER = re.compile(rf"\.(lora_(?:A|B))\.{ADAPTER_NAME}\.")
_UNNAMED_ADAPTER = re.compile(r"\.(lora_(?:A|B))\.(weight|bias)$")


def _module_names(value: Any) -> Any:
    """A lone YAML name (`target_modules: q_proj`) is a string, not a list; an empty list would adapt nothing.
    Checked before the list type, so a document gets this message too."""
    if value is not None and (isinstance(value, str) or not value):
        raise ValueError(f"lora: target_modules must be a non-empty list of names, got {value!r}")
    return value


@dataclasses.dataclass
class LoraMethodConfig(AdapterConfig):
    method = "lora"

    r: Int = 8
    """Rank of the update B·A (8 in the ChatGLM-6B LoRA projects)."""
    alpha: Float = 32.0
    """The update is scaled by alpha / r (peft's `lora_alpha`; 32 as in those projects)."""
    dropout: Float = 0.1
    """Dropout on the LoRA branch's input during training (peft's `lora_dropout`)."""
    target_modules: Annotated[list[str] | None, pydantic.BeforeValidator(_module_names)] = None
    """Module names to adapt; None takes the architecture's default from DEFAULT_TARGET_MODULES."""

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"lora: r must be at least 1, got {self.r}")
        if not self.alpha > 0:  # the update is scaled by alpha / r: at 0 every gradient is 0 and nothing trains
            raise ValueError(f"lora: alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora: dropout must be in [0, 1), got {self.dropout}")
        if self.target_modules is not None:
            self.target_modules = list(_module_names(self.target_modules))


def target_modules_for(model: nn.Module, config: LoraMethodConfig) -> list[str]:
    """The configured targets, or the default for the model's architecture."""
    if config.target_modules is not None:
        return list(config.target_modules)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGET_MODULES:
        raise ValueError(
            f"lora: no default target_modules for model_type {model_type!r} "
            f"(known: {', '.join(sorted(DEFAULT_TARGET_MODULES))}); set target_modules explicitly"
        )
    return list(DEFAULT_TARGET_MODULES[model_type])


def peft_lora_config(model: nn.Module, config: LoraMethodConfig, *, inference_mode: bool = False):
    """The equivalent `peft.LoraConfig` (what is injected and what adapter_config.json says)."""
    return LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=target_modules_for(model, config),
        bias="none",
        task_type="CAUSAL_LM",
        inference_mode=inference_mode,
        base_model_name_or_path=getattr(getattr(model, "config", None), "name_or_path", None) or None,
    )


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """The modules peft replaced with LoRA layers."""
    return [module for module in model.modules() if isinstance(module, LoraLayer)]


@register_method
class Lora(AdapterMethod):
    name = "lora"
    config_class = LoraMethodConfig
    presets = {
        # The ChatGLM-6B LoRA setup of the projects the official README cites (zero_nlp, ChatGLM-Tuning).
        "chatglm-qkv": {"r": 8, "alpha": 32.0, "dropout": 0.1, "target_modules": ["query_key_value"]},
        # Every linear layer of a ChatGLM-6B block.
        "chatglm-all-linear": {
            "r": 8,
            "alpha": 32.0,
            "dropout": 0.1,
            "target_modules": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
        },
        # The LoRA paper's LLaMA-style setting: queries and values.
        "llama-qv": {"r": 8, "alpha": 16.0, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]},
    }

    @classmethod
    def attach(cls, model: nn.Module, config: LoraMethodConfig) -> None:
        try:
            inject_adapter_in_model(peft_lora_config(model, config), model, adapter_name=ADAPTER_NAME)
        except NoMatchingPeftModuleError as error:
            linears = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
            raise ValueError(
                f"lora: target_modules {target_modules_for(model, config)} match no layer of this model; "
                f"its linear layers are named {', '.join(linears)}"
            ) from error
        # As get_peft_model does by default: fp32 LoRA weights on a fp16/bf16 base, so optimiser updates are not
        # rounded away; peft casts activations to and fro in the forward.
        cast_adapter_dtype(model, ADAPTER_NAME)

    @classmethod
    def is_trainable(cls, name: str, config: LoraMethodConfig, stage: str | None = None) -> bool:
        return _LORA_PARAMETER.search(name) is not None

    @classmethod
    def saved_key(cls, name: str, config: LoraMethodConfig) -> str:
        """`model.layers.0.self_attn.q_proj.lora_A.default.weight` -> peft's saved name."""
        return PEFT_KEY_PREFIX + _NAMED_ADAPTER.sub(r".\1.", name)

    @classmethod
    def model_key(cls, key: str, config: LoraMethodConfig) -> str:
        if not key.startswith(PEFT_KEY_PREFIX):
            raise ValueError(f"lora: saved key {key!r} does not start with peft's {PEFT_KEY_PREFIX!r}")
        return _UNNAMED_ADAPTER.sub(rf".\1.{ADAPTER_NAME}.\2", key.removeprefix(PEFT_KEY_PREFIX))

    @classmethod
    def write_extra_files(cls, model: nn.Module, config: LoraMethodConfig, directory: Path) -> None:
        """peft's own `adapter_config.json` (written by peft), so `PeftModel.from_pretrained` reads the folder."""
        peft_lora_config(model, config, inference_mode=True).save_pretrained(str(directory))

    @classmethod
    def merge(cls, model: nn.Module, config: LoraMethodConfig, *, keep_originals: bool = True) -> None:
        """W <- W + (alpha/r)·B·A in every adapted layer (peft's merge), for serving without extra matmuls.

        peft unmerges by subtracting the same product, so there are no originals to keep either way. A quantized
        base layer keeps its LoRA branch: folding would re-quantize W + B·A and lose the update to rounding."""
        for layer in lora_layers(model):
            if not layer.merged and not is_quantized_linear(layer):
                layer.merge()

    @classmethod
    def unmerge(cls, model: nn.Module, config: LoraMethodConfig) -> None:
        for layer in lora_layers(model):
            if layer.merged:
                layer.unmerge()
