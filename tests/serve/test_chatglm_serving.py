"""ChatGLM-6B through the same engine: round prompts, GLM positions, cleaned replies, prefixes."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor

from mmadapter.adapters import attach_adapter, make_config
from mmadapter.serve.chat import ChatTurn, stream_turn
from mmadapter.serve.loader import ServedModel
from mmadapter.serve.sampling import SamplingParams

GREEDY = SamplingParams(max_new_tokens=10, temperature=0.0)


@pytest.fixture
def glm_model(tiny_glm):
    return tiny_glm(seed=0, attn="eager")


class DecodableOnly(LogitsProcessor):
    """What the engine adds for every model: never pick an embedding row the tokenizer has no piece for."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.limit :] = -float("inf")
        return scores


def reference_generate(model, tokenizer, prompts, **kwargs):
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    output = model.generate(**inputs, do_sample=False, logits_processor=[DecodableOnly(len(tokenizer))], **kwargs)
    rows = output[:, inputs["input_ids"].shape[1] :].tolist()
    eop = tokenizer.eos_token_id
    return [row[: row.index(eop) + 1] if eop in row else row for row in rows]


def test_chat_turns_equal_the_official_chat(glm_model, glm_tokenizer):
    served = ServedModel.from_model(glm_model, glm_tokenizer, name="glm", defaults=GREEDY)
    assert served.template.name == "chatglm" and served.defaults.max_new_tokens == 10
    history = [("你好", "你好！"), ("今天天气", "很好。")]
    for turn_history in ((), history):
        events = list(stream_turn(served, ChatTurn("介绍下贵州", turn_history)))
        reply = "".join(event.text for event in events[1:])
        greedy = {"do_sample": False, "max_new_tokens": 10, "logits_processor": [DecodableOnly(len(glm_tokenizer))]}
        official, _ = glm_model.chat(glm_tokenizer, "介绍下贵州", list(turn_history), **greedy)
        assert reply == official
        prompt = glm_tokenizer([served.template.render("介绍下贵州", history=turn_history)])["input_ids"][0]
        assert events[0].prompt_tokens == len(prompt) and prompt[-2:] == [130001, 130004]


def test_padded_batch_and_prefix_equal_generate(glm_model, glm_tokenizer):
    prompts = ["你好", "介绍下贵州和清华大学"]
    served = ServedModel.from_model(glm_model, glm_tokenizer, name="glm", defaults=GREEDY)
    expected = reference_generate(glm_model, glm_tokenizer, prompts, max_new_tokens=10)
    assert [c.token_ids for c in served.engine.generate(prompts, GREEDY)] == expected

    attach_adapter(glm_model, make_config("ptuning-v2", pre_seq_len=4, prefix_dropout=0.0))
    with torch.no_grad():
        for param in glm_model.transformer.prefix_encoder.parameters():
            param.normal_()
    prefixed = reference_generate(glm_model, glm_tokenizer, prompts, max_new_tokens=10)
    assert prefixed != expected
    assert [c.token_ids for c in served.engine.generate(prompts, GREEDY)] == prefixed


def test_streamed_reply_is_cleaned_like_process_response():
    from mmadapter.adapters.backbones.chatglm import process_response
    from mmadapter.serve.model_families import FAMILIES
    from mmadapter.serve.text_stream import StablePostprocessor

    family = FAMILIES["chatglm"]
    raw = "  你好,世界!在[[训练时间]]训练: ok, fine  "
    for pieces in ([raw], list(raw), [raw[:7], raw[7:13], raw[13:]]):
        clean = StablePostprocessor(family.postprocess, family.unstable_tail)
        shown = "".join(clean.push(piece) for piece in pieces) + clean.flush()
        assert shown == process_response(raw) == "你好，世界！在2023年训练： ok, fine"
