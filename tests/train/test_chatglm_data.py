"""ChatGLM-6B P-Tuning v2 data: the official example construction, templates, and malformed-row reports."""

from __future__ import annotations

import json

import pytest
import torch

from mmadapter.train.chatglm_data import (
    IGNORE_INDEX,
    ChatGLMDataConfig,
    ChatGLMTrainingDataset,
    MalformedRowError,
    build_eval_example,
    build_training_example,
    eval_prompt,
    read_rows,
    training_prompt,
)

GMASK, SOP, EOP, PAD, DUMMY = 130001, 130004, 130005, 3, 5


class CharTokenizer:
    """ChatGLM-6B's tokenizer interface on characters: sentencepiece's lone '▁' (id 5) first, real special ids."""

    bos_token_id, eos_token_id, pad_token_id = SOP, EOP, PAD

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        assert not add_special_tokens, "the official recipe encodes without special tokens"
        return [DUMMY] + [self.id(c) for c in text]

    @staticmethod
    def id(char: str) -> int:
        return 1000 + ord(char)

    def build_inputs_with_special_tokens(self, a: list[int], b: list[int] | None = None) -> list[int]:
        ids = a + [GMASK, SOP]
        return ids + b + [EOP] if b is not None else ids


T = CharTokenizer()


def ids(text: str) -> list[int]:
    return [T.id(c) for c in text]


def write_lines(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    return path


def test_training_example_fits_exactly_without_padding():
    config = ChatGLMDataConfig(max_source_length=3, max_target_length=4)
    example = build_training_example(T, "你好", "世界", config)
    # prompt [▁ 你 好] truncated to max_source 3 - 1 = 2 tokens, answer [▁ 世 界] to max_target 4 - 2 = 2
    assert example["input_ids"] == [DUMMY, *ids("你"), GMASK, SOP, DUMMY, *ids("世"), EOP]
    assert example["labels"] == [IGNORE_INDEX] * 3 + [SOP, DUMMY, *ids("世"), EOP]
    assert len(example["input_ids"]) == 3 + 4


def test_training_example_is_right_padded_with_pads_ignored_in_labels():
    config = ChatGLMDataConfig(max_source_length=6, max_target_length=6)
    example = build_training_example(T, "类型#裙", "好看", config)
    prompt = [DUMMY, *ids("类型#裙")]
    answer = [DUMMY, *ids("好看")]
    assert example["input_ids"] == prompt + [GMASK, SOP] + answer + [EOP] + [PAD]
    # context_length = index of <sop> = 6: labels start there (the [gMASK] position learns to predict <sop>)
    assert example["labels"] == [IGNORE_INDEX] * 6 + [SOP] + answer + [EOP] + [IGNORE_INDEX]
    kept = ChatGLMDataConfig(max_source_length=6, max_target_length=6, ignore_pad_token_for_loss=False)
    assert build_training_example(T, "类型#裙", "好看", kept)["labels"][-2:] == [EOP, PAD]


def test_eval_example_truncates_like_tokenizer_truncation():
    config = ChatGLMDataConfig(max_source_length=4, max_target_length=3)
    example = build_eval_example(T, "一二三四", "甲乙", config)
    assert example["input_ids"] == [DUMMY, *ids("一"), GMASK, SOP]  # 4 tokens incl. the two specials
    assert example["labels"] == [DUMMY, GMASK, SOP]  # references also end in [gMASK] <sop> (official)


def test_round_template_rules_for_training_and_evaluation(tmp_path):
    config = ChatGLMDataConfig(prompt_column="prompt", response_column="response", history_column="history")
    chat = [
        {"prompt": "q2", "response": "r2", "history": [["q0", "r0"], ["q1", "r1"]]},
        {"prompt": "q", "response": "r", "history": []},
    ]
    rows = list(read_rows(write_lines(tmp_path / "chat.json", chat), config))
    expected = "[Round 0]\n问：q0\n答：r0\n[Round 1]\n问：q1\n答：r1\n[Round 2]\n问：q2\n答："
    assert training_prompt(rows[0], config) == eval_prompt(rows[0], config) == expected
    # Official quirk: training applies the template even to an empty history, evaluation does not.
    assert training_prompt(rows[1], config) == "[Round 0]\n问：q\n答："
    assert eval_prompt(rows[1], config) == "q"
    prefixed = ChatGLMDataConfig(source_prefix="广告：")
    row = next(read_rows(write_lines(tmp_path / "adgen.json", [{"content": "裙", "summary": "好"}]), prefixed))
    assert training_prompt(row, prefixed) == eval_prompt(row, prefixed) == "广告：裙"


def test_malformed_rows_name_file_and_line_and_a_policy_can_skip_them(tmp_path):
    path = write_lines(
        tmp_path / "train.json",
        [
            {"content": "a", "summary": "b"},
            "{not json",
            {"content": "c"},
            '["a list"]',
            {"content": 7, "summary": "d"},
            "",
            {"content": "", "summary": "dropped silently, as official"},
            {"content": "e", "summary": "f"},
        ],
    )
    config = ChatGLMDataConfig()
    with pytest.raises(MalformedRowError, match=r"train\.json:2: invalid JSON") as caught:
        list(read_rows(path, config))
    assert caught.value.line == 2 and caught.value.path == str(path)

    errors = []
    rows = list(read_rows(path, config, on_error=errors.append))
    assert [(r.query, r.response) for r in rows] == [("a", "b"), ("e", "f")]
    assert [r.source for r in rows] == [f"{path}:1", f"{path}:8"]
    assert [e.line for e in errors] == [2, 3, 4, 5]
    assert "missing column(s) ['summary']" in errors[1].reason
    assert "expected a JSON object" in errors[2].reason
    assert "column 'content' must be a string, got int" in errors[3].reason

    history = ChatGLMDataConfig(history_column="history")
    bad = write_lines(tmp_path / "chat.json", [{"content": "a", "summary": "b", "history": [["only one"]]}])
    with pytest.raises(MalformedRowError, match=r"chat\.json:1: history\[0\] must be a \[question, answer\] pair"):
        list(read_rows(bad, history))
    with pytest.raises(FileNotFoundError, match="data file not found"):
        list(read_rows(tmp_path / "missing.json", config))


def test_dataset_yields_equal_length_tensors(tmp_path):
    path = write_lines(
        tmp_path / "d.json", [{"content": "短", "summary": "一"}, {"content": "长长长", "summary": "二二"}]
    )
    config = ChatGLMDataConfig(max_source_length=5, max_target_length=5)
    dataset = ChatGLMTrainingDataset(path, T, config)
    batch = torch.utils.data.default_collate([dataset[0], dataset[1]])
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 10)
    assert batch["input_ids"][0].tolist() == [DUMMY, *ids("短"), GMASK, SOP, DUMMY, *ids("一"), EOP] + [PAD] * 3
    assert batch["input_ids"][1].tolist() == [DUMMY, *ids("长长长"), GMASK, SOP, DUMMY, *ids("二二"), EOP]
