"""Tiny tokenizers with Jinja chat templates shaped like the real ones, ids within the tiny models' 256 rows.

- `LLAMA3_TEMPLATE`: Llama 3.x's layout (header tokens, `| trim`, `<|eot_id|>`, BOS written by the template),
  with Llama 3.2 Vision's typed content parts (`{"type": "image"}` -> `<|image|>`).
- `CHATML_TEMPLATE`: Qwen2.5's (ChatML, a default system message when none is given); content parts are not
  supported (a list content fails, as in the real template).
- `QWEN3_TEMPLATE`: Qwen3's empty think block on the last assistant turn only, so earlier turns render
  differently once a later turn exists.
- `GENERATION_TEMPLATE`: ChatML with `{% generation %}` around each reply and its end token, for comparing
  with transformers' `return_assistant_tokens_mask`.
"""

from __future__ import annotations

import string

LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] | trim }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}{{- '<|image|>' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] | trim }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
CHATML_SYSTEM = "You are a helpful assistant."
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\n" + CHATML_SYSTEM + "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
QWEN3_TEMPLATE = (
    "{%- set ns = namespace(last_query=0) %}"
    "{%- for message in messages %}{%- if message.role == 'user' %}{%- set ns.last_query = loop.index0 %}"
    "{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and loop.index0 > ns.last_query %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
GENERATION_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message.content + '<|im_end|>' }}{%- endgeneration %}{{- '\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
#: A template with nothing after a reply: a model trained with it could not learn to stop.
OPEN_ENDED_TEMPLATE = "{%- for message in messages %}{{- message.role + ': ' + message.content + '\\n' }}{%- endfor %}"

CHAT_SPECIALS = (
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|image|>",
    "<think>",
    "</think>",
)
_WORDS = (
    "the a red green blue circle square triangle what colour shape is there one two describe image left right "
    "system user assistant you are helpful assistant. probe question reply mmadapter"
).split()


def build_chat_tokenizer(template: str | None = LLAMA3_TEMPLATE):
    """A byte-level BPE over a small alphabet (so every id is below 256) with LLaMA-style BOS/EOS and the chat
    special tokens of both template families."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<unk>", *CHAT_SPECIALS]
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=specials)
    text = [" ".join(_WORDS[i:] + _WORDS[:i]) for i in range(len(_WORDS))]
    tokenizer.train_from_iterator([*text * 4, string.printable], trainer)  # every printable character: no <unk>
    built = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=list(CHAT_SPECIALS),
    )
    built.chat_template = template
    assert len(built) <= 256, len(built)
    return built
