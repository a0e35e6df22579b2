"""ChatGLM-6B through the same engine: round prompts, GLM positions, cleaned replies, prefixes."""

from __future__ import annotations

import pytest
import sentencepiece as spm
import torch
from transformers import LogitsProcessor

from mmadapter.adapters import attach_adapter, make_config
from mmadapter.adapters.presets import base_config, build_base_model
from mmadapter.serve.chat import ChatTurn, stream_turn
from mmadapter.serve.loader import ServedModel
from mmadapter.serve.sampling import SamplingParams

GREEDY = SamplingParams(max_new_tokens=10, temperature=0.0)
# The tiny tokenizer of tests/adapters/chatglm (special pieces at ChatGLM-6B's real ids 130000-130007).
CORPUS = [
    "你好，世界！今天天气很好。",
    "我们一起学习机器学习。",
    "Hello world, this is a small test.",
    "介绍下贵州和清华大学。",
]
SPECIAL_PIECES = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]


@pytest.fixture(scope="module")
def glm_tokenizer(tmp_path_factory):
    from mmadapter.adapters.chatglm import ChatGLMTokenizer

    folder = tmp_path_factory.mktemp("ice_text")
    layout = ["<n>", "<|tab|>"] + [f"<|blank_{k}|>" for k in range(2, 81)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20),
        model_prefix=str(folder / "ice_text"),
        vocab_size=130000 + len(SPECIAL_PIECES) + len(layout) + 100,
        hard_vocab_limit=False,
        user_defined_symbols=[f"<|filler_{i}|>" for i in range(4, 130000)] + SPECIAL_PIECES + layout,
        model_type="unigram",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        pad_piece="<pad>",
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    return ChatGLMTokenizer(str(folder / "ice_text.model"))


@pytest.fixture
def glm_model():
    torch.manual_seed(0)
    model = build_base_model(base_config("tiny-chatglm"))
    with torch.no_grad():  # as tests/adapters/chatglm's tiny_glm: every parameter random, norms near 1
        for name, param in model.named_parameters():
            if "layernorm" in name and name.endswith("weight"):
                param.copy_(1 + 0.2 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
            else:
                param.normal_(0, 0.15)
    model.set_attn_implementation("eager")
    return model.requires_grad_(False).eval()


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
    from mmadapter.adapters.chatglm import process_response
    from mmadapter.serve.model_families import FAMILIES
    from mmadapter.serve.text_stream import StablePostprocessor

    family = FAMILIES["chatglm"]
    raw = "  你好,世界!在[[训练时间]]训练: ok, fine  "
    for pieces in ([raw], list(raw), [raw[:7], raw[7:13], raw[13:]]):
        clean = StablePostprocessor(family.postprocess, family.unstable_tail)
        shown = "".join(clean.push(piece) for piece in pieces) + clean.flush()
        assert shown == process_response(raw) == "你好，世界！在2023年训练： ok, fine"
