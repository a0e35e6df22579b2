"""The language side of mmadapter: base models, adapter methods, adapter checkpoints.

Typical use::

    from mmadapter.adapters import load_base_model, make_config, attach_adapter, mark_trainable
    model = load_base_model("path/to/llama-7b-hf", dtype="bf16")
    attach_adapter(model, make_config("llama-adapter-v1"))
    mark_trainable(model)
"""

# Importing a method module registers it (see `register_method`); importing `chatglm` registers the
# ChatGLM-6B backbone (model class, tokenizer loader, transformers Auto classes).
from mmadapter.adapters import (
    chatglm,  # noqa: F401
    llama_adapter_v1,  # noqa: F401
    llama_adapter_v2,  # noqa: F401
    lora,  # noqa: F401
    ptuning_v2,  # noqa: F401
)
from mmadapter.adapters.base import (
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
from mmadapter.adapters.checkpoint import load_adapter, save_adapter
from mmadapter.adapters.llama_adapter_v1 import LlamaAdapterV1Config
from mmadapter.adapters.loading import load_base_model, load_tokenizer
from mmadapter.adapters.presets import BASE_PRESETS, build_base_model

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
