"""The official P-Tuning v2 data pipeline with mmadapter's ChatGLM-6B tokenizer and model (integration).

The example construction itself is tested against hand-written ids in tests/train/test_chatglm_data.py;
here the real tokenizer must give the same ids as its own pair encoding / truncating call, and a batch
must train the prefix of the tiny model.
"""

from __future__ import annotations

import json

import torch

from mmadapter.adapters import attach_adapter, make_config, mark_trainable
from mmadapter.train.chatglm_data import (
    IGNORE_INDEX,
    ChatGLMDataConfig,
    ChatGLMTrainingDataset,
    build_eval_example,
    build_training_example,
)

# Characters the tiny sentencepiece model of tests/helpers/tiny_chatglm.py knows, with a newline and a space.
PROMPT, ANSWER = "介绍下贵州和清华大学", "今天天气很好。\n我们一起学习 机器学习"


def test_training_example_equals_the_tokenizers_pair_encoding(glm_tokenizer):
    config = ChatGLMDataConfig(max_source_length=64, max_target_length=64)
    example = build_training_example(glm_tokenizer, PROMPT, ANSWER, config)
    pair = glm_tokenizer.encode(PROMPT, ANSWER)  # prompt + [gMASK] <sop> + answer + <eop>
    assert example["input_ids"][: len(pair)] == pair
    assert set(example["input_ids"][len(pair) :]) == {glm_tokenizer.pad_token_id}
    sop = pair.index(glm_tokenizer.bos_token_id)
    assert pair[sop - 1] == 130001 and pair[-1] == glm_tokenizer.eos_token_id == 130005
    assert example["labels"][:sop] == [IGNORE_INDEX] * sop and example["labels"][sop : len(pair)] == pair[sop:]
    answer = glm_tokenizer.decode(pair[sop + 1 : -1])
    assert answer == ANSWER


def test_eval_example_equals_the_tokenizers_truncation(glm_tokenizer):
    config = ChatGLMDataConfig(max_source_length=6, max_target_length=5)
    example = build_eval_example(glm_tokenizer, PROMPT, ANSWER, config)
    assert example["input_ids"] == glm_tokenizer(PROMPT, max_length=6, truncation=True)["input_ids"]
    assert example["labels"] == glm_tokenizer(ANSWER, max_length=5, truncation=True)["input_ids"]


def test_a_batch_trains_the_prefix_of_the_tiny_model(glm_tokenizer, tiny_glm, tmp_path):
    path = tmp_path / "train.json"
    rows = [{"content": PROMPT, "summary": ANSWER}, {"content": "你好", "summary": "世界"}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    dataset = ChatGLMTrainingDataset(
        path, glm_tokenizer, ChatGLMDataConfig(max_source_length=16, max_target_length=16), progress=False
    )
    batch = torch.utils.data.default_collate([dataset[0], dataset[1]])
    model = attach_adapter(tiny_glm(), make_config("ptuning-v2", pre_seq_len=4, prefix_dropout=0.0))
    (weight,) = mark_trainable(model).values()
    model.train()
    loss = model(**batch).loss
    loss.backward()
    # The loss is the shifted cross-entropy over the answer tokens only.
    with torch.no_grad():
        logits = model.eval()(batch["input_ids"]).logits
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-5)
    assert torch.isfinite(loss) and weight.grad.abs().sum() > 0
