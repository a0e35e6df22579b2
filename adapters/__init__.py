"""The language side of mmadapter, in three layers: `backbones` (base models), `methods` (the adapters
that attach to them) and `io` (adapter folders, official checkpoints, the hub).

Typical use::

    from mmadapter.adapters import load_base_model, make_config, attach_adapter, mark_trainable
    model = load_base_model("path/to/llama-7b-hf", dtype="bf16")
    attach_adapter(model, make_config("llama-adapter-v1"))
    mark_trainable(model)
"""

from mmadapter.adapters import library_notices  # noqa: F401  (first: bitsandbytes logs while peft imports it)
from mmadapter.adapters.backbones import BASE_PRESETS, build_base_model, load_base_model, load_tokenizer
from mmadapter.adapters.io.checkpoint import load_adapter, save_adapter
from mmadapter.adapters.methods.base import (
    AdapterConfig,
    AdapterMethod,
    adapter_config_of,
    adapter_state_dict,
    attach_adapter,
    available_methods,
    config_from_dict,
    get_method,
    make_config,
    mark_trainable,
    optimizer_param_groups,
    register_method,
    trainable_parameters,
)
from mmadapter.adapters.methods.llama_adapter_v1 import LlamaAdapterV1Config

__all__ = [
    "AdapterConfig",
    "AdapterMethod",
    "BASE_PRESETS",
    "LlamaAdapterV1Config",
    "adapter_config_of",
    "adapter_state_dict",
    "attach_adapter",
    "available_methods",
    "build_base_model",
    "config_from_dict",
    "get_method",
    "load_adapter",
    "load_base_model",
    "load_tokenizer",
    "make_config",
    "mark_trainable",
    "optimizer_param_groups",
    "register_method",
    "save_adapter",
    "trainable_parameters",
]
