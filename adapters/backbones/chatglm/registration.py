"""Make ChatGLM-6B loadable by name: mmadapter's registries and transformers' Auto classes, no remote code.

After import, `load_base_model(folder)` / `load_tokenizer(folder)` and `AutoConfig`, `AutoModel`,
`AutoModelForCausalLM`, `AutoTokenizer` `.from_pretrained(folder)` use mmadapter's classes for a folder
whose config.json says `model_type: "chatglm"` (its `auto_map` to remote code is ignored).
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from mmadapter.adapters.backbones.chatglm.configuration import ChatGLMConfig, check_v1_config
from mmadapter.adapters.backbones.chatglm.modeling import ChatGLMForConditionalGeneration, ChatGLMModel
from mmadapter.adapters.backbones.chatglm.tokenizer import ChatGLMTokenizer
from mmadapter.adapters.backbones.loading import TOKENIZER_LOADERS
from mmadapter.adapters.backbones.presets import MODEL_CLASSES


def load_chatglm_tokenizer(folder: str | Path) -> ChatGLMTokenizer:
    """The tokenizer of a ChatGLM-6B folder (`ice_text.model` + optional tokenizer_config.json)."""
    folder = Path(folder)
    config_file = folder / "config.json"
    if config_file.is_file():
        check_v1_config(json.loads(config_file.read_text()), str(config_file))
    if not (folder / "ice_text.model").is_file():
        found = (
            "tokenizer.model (the ChatGLM2/ChatGLM3 tokenizer)" if (folder / "tokenizer.model").is_file() else "none"
        )
        raise FileNotFoundError(f"{folder}: no ice_text.model (ChatGLM-6B's sentencepiece model); found {found}")
    return ChatGLMTokenizer.from_pretrained(folder, local_files_only=True)


def register() -> None:
    MODEL_CLASSES[ChatGLMConfig.model_type] = ChatGLMForConditionalGeneration
    TOKENIZER_LOADERS[ChatGLMConfig.model_type] = load_chatglm_tokenizer
    AutoConfig.register(ChatGLMConfig.model_type, ChatGLMConfig, exist_ok=True)
    AutoModel.register(ChatGLMConfig, ChatGLMModel, exist_ok=True)
    AutoModelForCausalLM.register(ChatGLMConfig, ChatGLMForConditionalGeneration, exist_ok=True)
    AutoTokenizer.register(ChatGLMConfig, slow_tokenizer_class=ChatGLMTokenizer, exist_ok=True)
