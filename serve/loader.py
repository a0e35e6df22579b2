"""One loader for every front end: base + adapter folder -> a model that is ready to serve.

`load_served_model` loads the frozen base (preset or folder), attaches the adapter saved in a
folder, folds what can be folded into the weights (V2 bias/scale, LoRA; DESIGN §3 "merge for
inference"), and picks the prompt template the adapter was trained with, so nobody formats
prompts by hand. `ServedModel.from_model` wraps a model already in memory (the embedded demo).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mmadapter.adapters.backbones.chatglm.chat import CHAT_DEFAULTS
from mmadapter.adapters.backbones.loading import load_base_model, load_tokenizer
from mmadapter.adapters.backbones.presets import BASE_PRESETS
from mmadapter.adapters.io.checkpoint import load_adapter, read_adapter_config
from mmadapter.adapters.io.hub import download_adapter
from mmadapter.adapters.methods.base import get_method
from mmadapter.adapters.methods.llama_adapter_v2 import takes_images, visual_prompter_of
from mmadapter.core.templates import PromptTemplate, get_template
from mmadapter.serve.generate import GenerationEngine
from mmadapter.serve.sampling import SamplingParams

#: Template for a base model without an adapter (or an adapter saved without one), by model_type.
DEFAULT_TEMPLATES = {"llama": "alpaca", "chatglm": "chatglm"}
#: Generation defaults of the official demos: LLaMA-Adapter (spec llama-adapter §1.7, §3.9) and
#: ChatGLM-6B's chat()/stream_chat() (spec chatglm-6b-ptuning-v2 §2.8).
DEFAULT_SAMPLING = {
    "llama": SamplingParams(max_new_tokens=256, temperature=0.1, top_p=0.75),
    # chat()'s own defaults; max_length 2048 counts the prompt, so serving caps the answer instead.
    "chatglm": SamplingParams(
        max_new_tokens=512, temperature=CHAT_DEFAULTS["temperature"], top_p=CHAT_DEFAULTS["top_p"]
    ),
}


def adapter_method_name(model: nn.Module) -> str | None:
    config = getattr(model, "adapter_config", None)
    return None if config is None else config.method


def merge_for_serving(model: nn.Module) -> None:
    """Fold the adapter's mergeable parts into the base weights; serving never unmerges, so no copies are kept."""

    config = getattr(model, "adapter_config", None)
    if config is None:
        return
    get_method(config.method).merge(model, config, keep_originals=False)


@dataclasses.dataclass
class ServedModel:
    """A model, its tokenizer and prompt template, and the engine that generates with them."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    template: PromptTemplate
    name: str
    """The model id clients send (OpenAI `model` field) and /v1/models lists."""
    defaults: SamplingParams
    engine: GenerationEngine = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.engine = GenerationEngine(self.model, self.tokenizer)
        if self.takes_images:  # prompts remembered before the adapter's weights were loaded are stale
            visual_prompter_of(self.model).forget()

    @classmethod
    def from_model(
        cls,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        template: str | None = None,
        name: str = "mmadapter",
        defaults: SamplingParams | None = None,
    ) -> ServedModel:
        """Wrap a model already in memory (eval mode, merged or not) for the chat, API and web front ends."""
        model_type = model.config.model_type
        template_name = template or DEFAULT_TEMPLATES.get(model_type, "alpaca")
        model.eval()
        return cls(
            model,
            tokenizer,
            get_template(template_name),
            name,
            defaults or DEFAULT_SAMPLING.get(model_type, SamplingParams()),
        )

    @property
    def takes_images(self) -> bool:
        return takes_images(self.model)

    @property
    def method(self) -> str | None:
        return adapter_method_name(self.model)


def load_served_model(
    base: str | Path,
    adapter: str | Path | None = None,
    *,
    tokenizer: str | Path | None = None,
    template: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    name: str | None = None,
    adapter_overrides: dict[str, Any] | None = None,
    revision: str | None = None,
    merge: bool = True,
) -> ServedModel:
    """Load BASE (+ the adapter in ADAPTER, a folder or a hub repo id) ready to serve.

    `tokenizer` defaults to the base folder (presets have none: pass one). `dtype` defaults to
    bfloat16 on CUDA and float32 on CPU; `device` to CUDA when available. The template defaults
    to the adapter's saved `prompt_template`, then to the base model's usual one.
    """

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    tokenizer_source = tokenizer or base
    if str(tokenizer_source) in BASE_PRESETS:
        raise ValueError(f"base {base!r} is a preset without a tokenizer; pass a tokenizer folder (--tokenizer)")
    folder = None if adapter is None else download_adapter(adapter, revision)
    # A broken adapter config fails here, before the base loads for minutes.
    saved_template = None if folder is None else read_adapter_config(folder).get("prompt_template")
    model = load_base_model(base, dtype=dtype, device=device)
    if folder is not None:
        load_adapter(model, folder, **(adapter_overrides or {}))
        model.to(device)
        model.eval()
        if merge:
            merge_for_serving(model)
    source = Path(str(adapter if adapter is not None else base))
    served_name = name or (source.name if source.exists() else str(source))  # folder name, or preset / repo id
    return ServedModel.from_model(
        model, load_tokenizer(tokenizer_source), template=template or saved_template, name=served_name
    )
