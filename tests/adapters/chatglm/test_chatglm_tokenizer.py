"""ChatGLM-6B's tokenizer on a sentencepiece model trained in tests.helpers (special pieces at the real ids)."""

from __future__ import annotations

import json

import pytest
import torch

from mmadapter.adapters import load_tokenizer
from mmadapter.adapters.backbones.chatglm import ChatGLMTokenizer
from mmadapter.adapters.backbones.chatglm.tokenizer import decode_whitespace, encode_whitespace
from tests.helpers.chatglm_reference import EOP, GMASK, MASK, PAD, SOP

TEXTS = [
    "你好，世界！\n今天天气很好。\t我们一起学习  机器学习   和自然语言处理。",
    "Hello world,\n\tthe quick brown fox" + " " * 85 + "jumps over the lazy dog.",
    "def main():\n    return 42\n",
    "\n\nChatGLM-6B 是一个开源的对话语言模型",
]


def test_whitespace_preprocessing_is_the_official_one():
    text = "a\nb\tc  d" + " " * 85 + "e f"
    assert encode_whitespace(text) == "a<n>b<|tab|>c<|blank_2|>d<|blank_80|><|blank_5|>e f"
    assert decode_whitespace(encode_whitespace(text)) == text


@pytest.mark.parametrize("text", TEXTS)
def test_chinese_and_english_round_trip_through_the_preprocessing(glm_tokenizer, text):
    ids = glm_tokenizer.encode(text, add_special_tokens=False)
    pieces = glm_tokenizer.convert_ids_to_tokens(ids)
    assert glm_tokenizer.unk_token_id not in ids
    assert pieces.count("<n>") == text.count("\n") and pieces.count("<|tab|>") == text.count("\t")
    assert "\n" not in "".join(pieces) and "  " not in "".join(pieces).replace("▁", " ")
    assert glm_tokenizer.decode(ids) == text


def test_runs_of_spaces_become_blank_pieces(glm_tokenizer):
    pieces = glm_tokenizer.tokenize("学" + " " * 3 + "习" + " " * 81 + "学")
    assert "<|blank_3|>" in pieces and pieces.count("<|blank_80|>") == 1
    assert pieces[pieces.index("<|blank_80|>") + 1].startswith("▁")  # the 81st space stays a plain "▁"


def test_special_tokens_have_the_real_ids_and_are_appended(glm_tokenizer):
    tok = glm_tokenizer
    assert (tok.mask_token_id, tok.gmask_token_id, tok.bos_token_id, tok.eos_token_id) == (MASK, GMASK, SOP, EOP)
    assert (tok.pad_token_id, tok.unk_token_id) == (PAD, 0)
    assert tok.convert_tokens_to_ids(["[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>"]) == [
        130000,
        130001,
        130002,
        130004,
        130005,
    ]
    prompt = tok.encode("你好", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(prompt)[0] == "▁"  # sentencepiece's dummy prefix, as "你好" -> [5, ...]
    assert tok("你好").input_ids == prompt + [GMASK, SOP]
    answer = tok.encode("世界", add_special_tokens=False)
    assert tok("你好", "世界").input_ids == prompt + [GMASK, SOP] + answer + [EOP]
    assert tok.get_special_tokens_mask(prompt, answer) == [0] * len(prompt) + [1, 1] + [0] * len(answer) + [1]
    ids = tok("你好").input_ids
    assert tok.decode(ids) == "你好[gMASK]<sop>"
    assert tok.decode(ids, skip_special_tokens=True) == "你好"
    # Pads and ids past the sentencepiece vocabulary (embedding padding rows) are dropped, not crashed on.
    assert tok.decode([PAD, PAD] + prompt + [len(tok) + 5, 130527]) == "你好"


def test_batches_are_left_padded_and_truncation_keeps_the_special_tokens(glm_tokenizer):
    batch = glm_tokenizer(["你好", "今天天气很好"], padding=True, return_tensors="pt")
    short = glm_tokenizer("你好").input_ids
    width = batch["input_ids"].shape[1]
    assert batch["input_ids"][0].tolist() == [PAD] * (width - len(short)) + short
    assert batch["attention_mask"][0].tolist() == [0] * (width - len(short)) + [1] * len(short)
    assert set(batch) == {"input_ids", "attention_mask"}
    truncated = glm_tokenizer("今天天气很好，我们一起学习", max_length=6, truncation=True).input_ids
    assert len(truncated) == 6 and truncated[-2:] == [GMASK, SOP]


def test_tokenizer_batch_feeds_the_model_like_single_rows(glm_tokenizer, tiny_glm):
    model = tiny_glm()
    texts = ["你好", "今天天气很好。\n学习"]
    batch = glm_tokenizer(texts, padding=True, return_tensors="pt")
    logits = model(**batch).logits
    for i, text in enumerate(texts):
        single = model(**glm_tokenizer([text], return_tensors="pt")).logits[0]
        real = batch["attention_mask"][i].bool()
        torch.testing.assert_close(logits[i][real], single, atol=2e-5, rtol=0)


def test_save_and_load_through_transformers_and_mmadapter(glm_tokenizer, glm_vocab_file, tmp_path):
    from transformers import AutoTokenizer

    glm_tokenizer.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "ice_text.model").read_bytes() == glm_vocab_file.read_bytes()
    reloaded = ChatGLMTokenizer.from_pretrained(tmp_path / "saved")
    assert reloaded.encode(TEXTS[0]) == glm_tokenizer.encode(TEXTS[0])
    # An official folder: config.json with model_type chatglm, tokenizer_config.json naming the remote class.
    official = tmp_path / "official"
    official.mkdir()
    (official / "ice_text.model").write_bytes(glm_vocab_file.read_bytes())
    (official / "config.json").write_text(json.dumps({"model_type": "chatglm", "auto_map": {}}))
    tokenizer_config = {
        "name_or_path": "THUDM/chatglm-6b",
        "bos_token": "<sop>",
        "eos_token": "<eop>",
        "end_token": "</s>",
        "gmask_token": "[gMASK]",
        "mask_token": "[MASK]",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "remove_space": False,
        "do_lower_case": False,
        "num_image_tokens": 0,
        "tokenizer_class": "ChatGLMTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
    }
    (official / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    for tokenizer in (load_tokenizer(official), AutoTokenizer.from_pretrained(official)):
        assert isinstance(tokenizer, ChatGLMTokenizer) and tokenizer.padding_side == "left"
        assert tokenizer.encode(TEXTS[1]) == glm_tokenizer.encode(TEXTS[1])


def test_pre_slim_tokenizer_layout_is_refused(glm_vocab_file):
    with pytest.raises(ValueError, match="num_image_tokens=20000"):
        ChatGLMTokenizer(str(glm_vocab_file), num_image_tokens=20000)
