"""`data.template: chat | auto`: conversation files through the tokenizer's chat template, the choice recorded."""

from __future__ import annotations

import json

import pytest

from mmadapter.core.encoding import IGNORE_INDEX
from mmadapter.train.data import BadSampleLog, load_samples, resolve_recipe_templates
from mmadapter.train.evaluate import generation_scores, load_for_eval
from mmadapter.train.loop import train
from mmadapter.train.readers import read_examples
from mmadapter.train.recipe import DataSection, DataSource, parse_recipe
from tests.helpers.chat_tokenizer import LLAMA3_TEMPLATE, build_chat_tokenizer
from tests.helpers.tiny_recipe import tiny_recipe
from tests.helpers.train_data import write_image, write_jsonl

SYSTEM = "you are helpful"
ROWS = [
    {
        "image": "red.png",
        "conversations": [
            {"from": "system", "value": SYSTEM},
            {"from": "human", "value": "<image>\nwhat colour is the circle"},
            {"from": "gpt", "value": "red"},
            {"from": "human", "value": "what shape is it"},
            {"from": "gpt", "value": "a circle"},
        ],
    },
    {"conversations": [{"from": "human", "value": "what colour is the square"}, {"from": "gpt", "value": "blue"}]},
]


@pytest.fixture
def chat_tokenizer():
    return build_chat_tokenizer(LLAMA3_TEMPLATE)


@pytest.fixture
def conversations(tmp_path):
    write_image(tmp_path / "red.png", "red")
    return write_jsonl(tmp_path / "chat.jsonl", ROWS)


def test_conversation_rows_keep_the_system_message_and_the_image(conversations):
    first, second = read_examples("conversation", conversations)
    assert first.system == SYSTEM and first.image.name == "red.png"
    assert first.turns == (("what colour is the circle", "red"), ("what shape is it", "a circle"))
    assert second.system == "" and second.image is None


def test_samples_are_the_chat_template_conversation_with_loss_on_replies(conversations, chat_tokenizer):
    source = DataSource(format="conversation", path=str(conversations))
    samples = load_samples([source], chat_tokenizer, DataSection(template="chat"), [None], None, BadSampleLog())
    parts = [{"type": "image"}, {"type": "text", "text": "what colour is the circle"}]
    expected = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": parts},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "what shape is it"},
        {"role": "assistant", "content": "a circle"},
    ]
    assert samples[0].input_ids == chat_tokenizer.apply_chat_template(expected, return_dict=False)
    trained = chat_tokenizer.decode([t for t in samples[0].labels if t != IGNORE_INDEX])
    assert trained == "red<|eot_id|>a circle<|eot_id|>"


def recipe_document(tmp_path, tokenizer_dir, template: str) -> dict:
    rows = [
        {"conversations": [{"from": "human", "value": f"what colour is the {s}"}, {"from": "gpt", "value": c}]}
        for s, c in (("circle", "red"), ("square", "blue"), ("triangle", "green"), ("image", "yellow"))
    ]
    data = [{"format": "conversation", "path": str(write_jsonl(tmp_path / "chat.jsonl", rows))}]
    return tiny_recipe(
        tmp_path, tokenizer_dir, data, train={"max_steps": 2}, data_options={"template": template}, parsed=False
    )


def test_auto_resolves_per_tokenizer_and_chat_needs_a_template(tmp_path, chat_tokenizer):
    recipe = parse_recipe(recipe_document(tmp_path, tmp_path, "auto"))
    resolve_recipe_templates(recipe, chat_tokenizer, "llama")
    assert recipe.stages[0].data.template == "chat"
    plain = build_chat_tokenizer(None)
    for model_type, official in (("llama", "alpaca"), ("chatglm", "chatglm")):
        recipe = parse_recipe(recipe_document(tmp_path, tmp_path, "auto"))
        resolve_recipe_templates(recipe, plain, model_type)
        assert recipe.stages[0].data.template == official
    recipe = parse_recipe(recipe_document(tmp_path, tmp_path, "chat"))
    with pytest.raises(ValueError, match="data.template: chat: the tokenizer has no chat_template"):
        resolve_recipe_templates(recipe, plain, "llama")


@pytest.mark.slow
def test_training_with_the_chat_template_records_it_in_the_adapter_folder(tmp_path, chat_tokenizer, capsys):
    tokenizer_dir = tmp_path / "tokenizer"
    chat_tokenizer.save_pretrained(tokenizer_dir)
    result = train(parse_recipe(recipe_document(tmp_path, tokenizer_dir, "auto")))
    assert result.summary["steps"] == 2
    # The log shows the first sample as the model reads it, the trained tokens (the reply + end of turn) in [[ ]].
    log = capsys.readouterr().out
    assert "first sample (" in log and "trained tokens in [[ ]]" in log
    assert "what colour is the circle<|eot_id|>" in log and "[[red<|eot_id|>]]" in log and "[[what" not in log
    assert "user<|end_header_id|>" in log  # the template's own markup, special tokens included
    document = json.loads((result.adapter_dir / "mmadapter_config.json").read_text())
    assert document["prompt_template"] == "chat" and document["chat_template"] == LLAMA3_TEMPLATE
    assert document["training"]["stages"][0]["data"]["template"] == "chat"  # the resolved recipe says what ran
    model, tokenizer, data = load_for_eval(result.adapter_dir)
    sources = [DataSource(format="conversation", path=str(tmp_path / "chat.jsonl"))]
    scores = generation_scores(model, tokenizer, sources, data, max_new_tokens=3, greedy=True, limit=2)
    assert scores["generated"] == 2
