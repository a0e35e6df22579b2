"""mmadapter's own ChatGLM-6B (first generation): config, model, tokenizer and chat, without remote code.

Typical use::

    from mmadapter.adapters import load_base_model, load_tokenizer
    model = load_base_model("path/to/chatglm-6b", dtype="fp16", device="cuda")
    tokenizer = load_tokenizer("path/to/chatglm-6b")
    response, history = model.chat(tokenizer, "你好", history=[])
"""

from mmadapter.adapters.backbones.chatglm.chat import chat, process_response, stream_chat
from mmadapter.adapters.backbones.chatglm.configuration import ChatGLMConfig
from mmadapter.adapters.backbones.chatglm.masks import glm_blocked_mask, glm_position_ids
from mmadapter.adapters.backbones.chatglm.modeling import ChatGLMForConditionalGeneration, ChatGLMModel
from mmadapter.adapters.backbones.chatglm.registration import load_chatglm_tokenizer, register
from mmadapter.adapters.backbones.chatglm.tokenizer import ChatGLMTokenizer

register()

__all__ = [
    "ChatGLMConfig",
    "ChatGLMForConditionalGeneration",
    "ChatGLMModel",
    "ChatGLMTokenizer",
    "chat",
    "glm_blocked_mask",
    "glm_position_ids",
    "load_chatglm_tokenizer",
    "process_response",
    "stream_chat",
]
