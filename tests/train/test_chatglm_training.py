"""The official ChatGLM-6B recipe path: AdvertiseGen rows in ChatGLM's own layout, P-Tuning v2 and LoRA
on the tiny ChatGLM, loss falls; `mmadapter eval` scores generated answers with ROUGE / BLEU-4."""

from __future__ import annotations

import json

import pytest

from mmadapter.adapters.methods.base import attach_adapter, make_config
from mmadapter.core.encoding import IGNORE_INDEX
from mmadapter.train.data import BadSampleLog, load_samples
from mmadapter.train.evaluate import generation_scores
from mmadapter.train.loop import train
from mmadapter.train.recipe import DataSection, DataSource, parse_recipe
from tests.helpers.train_data import write_jsonl

COLOURS = {"红色": "热情的红色", "蓝色": "清新的蓝色", "白色": "干净的白色"}
CLOTHES = ("上衣", "裙子", "外套")


def advertise_rows() -> list[dict[str, str]]:
    return [
        {"content": f"类型#{kind}*颜色#{colour}", "summary": f"这件{kind}是{phrase}。"}
        for kind in CLOTHES
        for colour, phrase in COLOURS.items()
    ]


def test_chatglm_rows_use_the_official_layout_without_padding(tmp_path, glm_tokenizer):  # noqa: F811
    path = write_jsonl(tmp_path / "train.json", [*advertise_rows()[:2], {"content": "x", "summary": ""}])
    source = DataSource(format="chatglm", path=str(path))
    samples = load_samples(
        [source],
        glm_tokenizer,
        DataSection(max_source_length=8, max_target_length=8),
        [None],
        None,
        BadSampleLog(),
        show_progress=False,
    )
    assert len(samples) == 2  # the empty summary is dropped, as the official code does
    prompt = glm_tokenizer.encode("类型#上衣*颜色#红色", add_special_tokens=False)[:7]
    answer = glm_tokenizer.encode("这件上衣是热情的红色。", add_special_tokens=False)[:6]
    gmask, sop, eop = 130001, glm_tokenizer.bos_token_id, glm_tokenizer.eos_token_id
    assert samples[0].input_ids == prompt + [gmask, sop] + answer + [eop]
    assert samples[0].labels == [IGNORE_INDEX] * (len(prompt) + 1) + [sop] + answer + [eop]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "options", "lr"),
    [
        ("ptuning-v2", {"pre_seq_len": 4, "prefix_dropout": 0.0}, 0.05),
        ("lora", {"r": 4, "alpha": 8, "dropout": 0.0}, 0.01),
    ],
)
def test_chatglm_loss_falls_and_eval_scores_generations(method, options, lr, tmp_path, tiny_glm, glm_tokenizer):  # noqa: F811
    data = write_jsonl(tmp_path / "train.json", advertise_rows())
    document = {
        "name": f"glm-{method}",
        "output_dir": str(tmp_path / "run"),
        "model": {"base": "tiny-chatglm"},
        "adapter": {"method": method, "options": options},
        "train": {"batch_size": 3, "max_steps": 6, "lr": lr, "schedule": "linear", "log_every": 1, "log_with": "none"},
        "data": {
            "train": [{"format": "chatglm", "path": str(data)}],
            "eval_from_train": 9,
            "template": "chatglm",
            "max_source_length": 16,
            "max_target_length": 16,
        },
    }
    model = attach_adapter(tiny_glm(), make_config(method, **options))
    result = train(parse_recipe(document), model=model, tokenizer=glm_tokenizer)
    first = result.summary["stages"][0]["history"][0]["loss"]
    assert result.summary["final_eval_loss"] < first - 0.1, (first, result.summary["final_eval_loss"])
    saved = json.loads((result.adapter_dir / "mmadapter_config.json").read_text())
    assert saved["adapter"]["method"] == method and saved["prompt_template"] == "chatglm"

    scores = generation_scores(
        model.eval(),
        glm_tokenizer,
        [DataSource(format="chatglm", path=str(data))],
        parse_recipe(document).stages[0].data,
        greedy=True,
        limit=3,
    )
    assert scores["generated"] == 3 and all(0.0 <= scores[k] <= 100.0 for k in ("rouge-1", "rouge-l", "bleu-4"))
