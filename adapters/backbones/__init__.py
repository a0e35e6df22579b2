"""Base models the adapters attach to: LLaMA through transformers (Hugging Face or Meta layout) and
mmadapter's own ChatGLM-6B. Importing this package registers ChatGLM-6B with the loaders and with
transformers' Auto classes."""

from mmadapter.adapters.backbones import chatglm  # noqa: F401  (registers the ChatGLM-6B backbone)
from mmadapter.adapters.backbones.loading import load_base_model, load_tokenizer, read_base_config
from mmadapter.adapters.backbones.presets import BASE_PRESETS, build_base_model

__all__ = ["BASE_PRESETS", "build_base_model", "load_base_model", "load_tokenizer", "read_base_config"]
