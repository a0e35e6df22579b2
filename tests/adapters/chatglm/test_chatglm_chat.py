"""`chat()` / `stream_chat()`: the official round prompt, sampling defaults, <eop> stop and reply clean-up."""

from __future__ import annotations

import torch

from mmadapter.adapters.backbones.chatglm import process_response
from mmadapter.adapters.backbones.chatglm.chat import InvalidScoreLogitsProcessor, decode_reply
from tests.helpers.chatglm_reference import EOP

HISTORY = [("你好", "你好！"), ("今天天气", "很好。")]
ROUND_PROMPT = "[Round 0]\n问：你好\n答：你好！\n[Round 1]\n问：今天天气\n答：很好。\n[Round 2]\n问：学习\n答："


def test_process_response_is_the_official_clean_up():
    assert process_response("  你好,世界!今天:天气;好?  ") == "你好，世界！今天：天气；好？"
    assert process_response("中,a a,中 a,b") == "中，a a，中 a,b"
    assert process_response("Hello, world! a: b; c?") == "Hello, world! a: b; c?"
    assert process_response("我在[[训练时间]]训练") == "我在2023年训练"


def test_invalid_scores_are_replaced_by_the_fallback_token():
    processor = InvalidScoreLogitsProcessor(fallback_token_id=5)
    broken = torch.tensor([[0.0, float("nan"), 1.0, 2.0, 3.0, 4.0, 5.0]])
    assert processor(None, broken).argmax(-1).item() == 5
    finite = torch.randn(2, 7)
    assert torch.equal(processor(None, finite), finite)


def eop_first(model):
    """Rig the tiny model so that <eop> is the only sensible next token."""
    with torch.no_grad():
        final = model.transformer.final_layernorm
        final.weight.zero_()
        final.bias.copy_(torch.linspace(-1, 1, final.bias.numel()))
        model.transformer.word_embeddings.weight[EOP] = 50 * final.bias
    return model


def test_chat_uses_the_round_prompt_and_official_sampling_defaults(tiny_glm, glm_tokenizer, monkeypatch):
    model = eop_first(tiny_glm())
    seen = {}
    generate = model.generate

    def recording_generate(**kwargs):
        seen.update(kwargs)
        return generate(**kwargs)

    monkeypatch.setattr(model, "generate", recording_generate)
    response, history = model.chat(glm_tokenizer, "学习", history=HISTORY)
    assert seen["input_ids"].tolist() == [glm_tokenizer(ROUND_PROMPT).input_ids]
    assert (seen["do_sample"], seen["top_p"], seen["temperature"], seen["max_length"]) == (True, 0.7, 0.95, 2048)
    assert seen["num_beams"] == 1
    assert isinstance(seen["logits_processor"][0], InvalidScoreLogitsProcessor)
    assert response == ""  # stopped at <eop> right away
    assert history == HISTORY + [("学习", "")]
    # Without history the prompt is the bare query.
    model.chat(glm_tokenizer, "学习")
    assert seen["input_ids"].tolist() == [glm_tokenizer("学习").input_ids]


def test_chat_reply_is_the_decoded_generation_up_to_eop(tiny_glm, glm_tokenizer):
    model = tiny_glm(attn="sdpa")
    response, history = model.chat(glm_tokenizer, "你好", do_sample=False, max_new_tokens=5)
    prompt = glm_tokenizer(["你好"], return_tensors="pt")
    ids = model.generate(**prompt, do_sample=False, max_new_tokens=5)[0, prompt["input_ids"].shape[1] :]
    assert response == decode_reply(glm_tokenizer, ids.tolist())
    assert history == [("你好", response)]
    cut = decode_reply(glm_tokenizer, glm_tokenizer.encode("你好", add_special_tokens=False) + [EOP, 130100])
    assert cut == "你好"


def test_stream_chat_grows_to_the_chat_reply_and_can_be_abandoned(tiny_glm, glm_tokenizer):
    model = tiny_glm(attn="sdpa")
    expected, _ = model.chat(glm_tokenizer, "学习", history=HISTORY, do_sample=False, max_new_tokens=4)
    updates = list(model.stream_chat(glm_tokenizer, "学习", history=HISTORY, do_sample=False, max_new_tokens=4))
    assert 1 <= len(updates) <= 4
    assert updates[-1][0] == expected
    assert all(history == HISTORY + [("学习", partial)] for partial, history in updates)
    stream = model.stream_chat(glm_tokenizer, "学习", do_sample=False, max_new_tokens=50)
    next(stream)
    stream.close()  # stops the generating thread instead of leaving it running


def test_stream_chat_samples_exactly_what_chat_samples(tiny_glm, glm_tokenizer):
    """Official sampling (top-p 0.7, temperature 0.95): one token per step draws the same numbers as chat()."""
    model = tiny_glm(attn="sdpa")
    replies = []
    for seed in (3, 4):
        torch.manual_seed(seed)
        expected, _ = model.chat(glm_tokenizer, "学习", history=HISTORY, max_new_tokens=6)
        torch.manual_seed(seed)
        updates = list(model.stream_chat(glm_tokenizer, "学习", history=HISTORY, max_new_tokens=6))
        assert updates[-1][0] == expected
        replies.append(expected)
    assert replies[0] != replies[1]  # the seeds matter, so equality above is not a coincidence
