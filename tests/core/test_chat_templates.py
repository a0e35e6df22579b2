"""Training examples through a tokenizer's chat template: ids are apply_chat_template's, loss on assistant turns only."""

from __future__ import annotations

import re

import pytest

from mmadapter.core.chat_templates import ChatTemplate, chat_template_of
from mmadapter.core.encoding import IGNORE_INDEX, encode, encode_prompt
from mmadapter.core.examples import DataError, Example
from mmadapter.core.templates import get_template, resolve_template
from tests.helpers.chat_tokenizer import (
    CHATML_SYSTEM,
    CHATML_TEMPLATE,
    GENERATION_TEMPLATE,
    LLAMA3_TEMPLATE,
    OPEN_ENDED_TEMPLATE,
    QWEN3_TEMPLATE,
    build_chat_tokenizer,
)

TURNS = (("what colour is the circle", "red"), ("what shape is left", "a green square"))
SYSTEM = "you are helpful"
#: Where each template's assistant replies (with their end-of-turn token) are, found by pattern in the text.
REPLY_PATTERNS = {
    "llama3": r"<\|start_header_id\|>assistant<\|end_header_id\|>\n\n(.*?<\|eot_id\|>)",
    "chatml": r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)",
}
TEMPLATES = {"llama3": LLAMA3_TEMPLATE, "chatml": CHATML_TEMPLATE}


@pytest.fixture(scope="module", params=sorted(TEMPLATES))
def family(request):
    tokenizer = build_chat_tokenizer(TEMPLATES[request.param])
    return request.param, tokenizer, chat_template_of(tokenizer)


def messages(turns=TURNS, system=""):
    out = [{"role": "system", "content": system}] if system else []
    for question, reply in turns:
        out += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
    return out


def chat_ids(tokenizer, conversation, **kwargs) -> list[int]:
    return tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=False, **kwargs)


def reference_labels(tokenizer, conversation, pattern: str) -> list[int]:
    """Labels written plainly: the tokens whose characters lie inside a reply + end-of-turn span of the text."""
    text = tokenizer.apply_chat_template(conversation, tokenize=False)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = [match.span(1) for match in re.finditer(pattern, text, re.S)]
    return [
        token if any(start <= a and b <= end for start, end in spans) else IGNORE_INDEX
        for token, (a, b) in zip(encoding["input_ids"], encoding["offset_mapping"], strict=True)
    ]


def test_probe_finds_the_end_of_turn_token_and_image_support(family):
    name, tokenizer, template = family
    expected = {"llama3": ("<|eot_id|>", True), "chatml": ("<|im_end|>", False)}[name]
    assert (template.end_of_turn, template.image_parts) == expected
    assert template.stop_token_ids == (tokenizer.convert_tokens_to_ids(expected[0]),)
    assert template.source == TEMPLATES[name] and template.name == "chat"


@pytest.mark.parametrize("system", ["", SYSTEM])
@pytest.mark.parametrize("turns", [TURNS[:1], TURNS], ids=["one-turn", "multi-turn"])
def test_ids_are_apply_chat_template_and_labels_only_the_replies(family, turns, system):
    name, tokenizer, template = family
    example = Example("x.json[0]", turns, system=system)
    encoded = encode(example, tokenizer, template, max_length=512, caption_instruction="")
    conversation = messages(turns, system)
    assert encoded.input_ids == chat_ids(tokenizer, conversation)
    assert encoded.labels == reference_labels(tokenizer, conversation, REPLY_PATTERNS[name])
    # What is trained, turn by turn: exactly each reply and its end-of-turn token.
    trained = [t for t in encoded.labels if t != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "".join(reply + template.end_of_turn for _, reply in turns)


def test_system_message_is_in_the_prompt_and_never_trained(family):
    name, tokenizer, template = family
    with_system = encode(
        Example("x", TURNS[:1], system=SYSTEM), tokenizer, template, max_length=512, caption_instruction=""
    )
    text = tokenizer.decode(with_system.input_ids)
    assert SYSTEM in text and SYSTEM not in tokenizer.decode([t for t in with_system.labels if t != IGNORE_INDEX])
    if name == "chatml":  # Qwen2.5's template writes its default system message when none is given
        plain = encode(Example("x", TURNS[:1]), tokenizer, template, max_length=512, caption_instruction="")
        assert CHATML_SYSTEM in tokenizer.decode(plain.input_ids)


def test_image_row_gets_the_placeholder_only_where_the_template_renders_image_parts(family):
    name, tokenizer, template = family
    example = Example("x", TURNS[:1], image=__file__)  # any path: encoding never opens the image
    encoded = encode(example, tokenizer, template, max_length=512, caption_instruction="")
    image_id = tokenizer.convert_tokens_to_ids("<|image|>")
    question, reply = TURNS[0]
    if name == "llama3":
        parts = [{"type": "image"}, {"type": "text", "text": question}]
        conversation = [{"role": "user", "content": parts}, {"role": "assistant", "content": reply}]
        assert encoded.input_ids.count(image_id) == 1
    else:  # a text-only template: the picture enters only as V2's visual prompt
        conversation = messages(TURNS[:1])
        assert image_id not in encoded.input_ids
    assert encoded.input_ids == chat_ids(tokenizer, conversation)
    assert encoded.labels == reference_labels(tokenizer, conversation, REPLY_PATTERNS[name])


def test_caption_and_alpaca_input_rows(family):
    _, tokenizer, template = family
    caption = Example("c", (("", "a red circle"),), image=__file__, caption=True)
    encoded = encode(caption, tokenizer, template, max_length=512, caption_instruction="describe the image")
    assert "describe the image" in tokenizer.decode(encoded.input_ids)
    alpaca = Example("a", (("describe", "a red circle"),), input="the image")
    same = Example("a", (("describe\nthe image", "a red circle"),))
    kwargs = {"max_length": 512, "caption_instruction": ""}
    assert encode(alpaca, tokenizer, template, **kwargs) == encode(same, tokenizer, template, **kwargs)


def test_prompt_is_the_generation_prompt_and_a_prefix_of_the_training_ids(family):
    _, tokenizer, template = family
    example = Example("x", TURNS, system=SYSTEM)
    prompt = encode_prompt(example, tokenizer, template)
    asked = [*messages(TURNS, SYSTEM)[:-1]]
    assert prompt == chat_ids(tokenizer, asked, add_generation_prompt=True)
    trained = encode(example, tokenizer, template, max_length=512, caption_instruction="")
    assert trained.input_ids[: len(prompt)] == prompt  # serving asks exactly as training saw it
    assert trained.labels[len(prompt) - 1] == IGNORE_INDEX and trained.labels[len(prompt)] != IGNORE_INDEX


def test_labels_equal_transformers_assistant_mask_where_the_template_marks_generation():
    tokenizer = build_chat_tokenizer(GENERATION_TEMPLATE)
    encoded = encode(
        Example("x", TURNS), tokenizer, chat_template_of(tokenizer), max_length=512, caption_instruction=""
    )
    out = tokenizer.apply_chat_template(messages(TURNS), return_dict=True, return_assistant_tokens_mask=True)
    assert encoded.input_ids == out["input_ids"]
    assert [label != IGNORE_INDEX for label in encoded.labels] == [bool(m) for m in out["assistant_masks"]]


def test_templates_without_generation_markers_give_transformers_an_empty_mask():
    """Why the labels are built by rendering: the Llama 3 / Qwen templates have no {% generation %} block."""
    tokenizer = build_chat_tokenizer(CHATML_TEMPLATE)
    out = tokenizer.apply_chat_template(messages(TURNS), return_dict=True, return_assistant_tokens_mask=True)
    assert not any(out["assistant_masks"])


def test_a_template_that_renders_earlier_turns_differently_once_a_later_one_exists():
    """Qwen3: the last reply gets an empty think block, earlier ones do not; spans come from the whole render."""
    tokenizer = build_chat_tokenizer(QWEN3_TEMPLATE)
    template = chat_template_of(tokenizer)
    encoded = encode(Example("x", TURNS), tokenizer, template, max_length=512, caption_instruction="")
    assert encoded.input_ids == chat_ids(tokenizer, messages(TURNS))
    trained = tokenizer.decode([t for t in encoded.labels if t != IGNORE_INDEX])
    assert trained == "red<|im_end|><think>\n\n</think>\n\na green square<|im_end|>"


def test_template_refusals_name_the_reason():
    with pytest.raises(ValueError, match="no special token right after an assistant reply"):
        chat_template_of(build_chat_tokenizer(OPEN_ENDED_TEMPLATE))
    with pytest.raises(ValueError, match="has no chat_template"):
        resolve_template("chat", build_chat_tokenizer(None), "llama")
    strict = ChatTemplate("{{ raise_exception('only user and assistant roles are supported') }}", "</s>", 2, False)
    with pytest.raises(DataError, match="only user and assistant roles"):
        encode(Example("x", TURNS), build_chat_tokenizer(), strict, max_length=9, caption_instruction="")


def test_a_reply_the_template_rewrites_is_refused_not_matched_in_a_later_turn():
    shout = "message['role'] == 'assistant' and not loop.last"
    earlier_shouted = f"{{{{- message['content'] | upper if {shout} else message['content'] | trim }}}}"
    shouting = LLAMA3_TEMPLATE.replace("{{- message['content'] | trim }}", earlier_shouted)
    tokenizer = build_chat_tokenizer(shouting)
    turns = (("what colour", "red"), ("and now", "red"))
    with pytest.raises(DataError, match="does not render reply 0 as written, followed by <\\|eot_id\\|>"):
        encode(Example("x", turns), tokenizer, chat_template_of(tokenizer), max_length=512, caption_instruction="")


def test_auto_picks_the_chat_template_when_there_is_one():
    with_template, without = build_chat_tokenizer(CHATML_TEMPLATE), build_chat_tokenizer(None)
    assert resolve_template("auto", with_template, "llama").name == "chat"
    assert resolve_template("auto", without, "llama") is get_template("alpaca")
    assert resolve_template("auto", without, "chatglm") is get_template("chatglm")
    assert resolve_template("auto", without, "llama", chat_template=CHATML_TEMPLATE).source == CHATML_TEMPLATE


def test_official_templates_put_the_system_message_before_the_first_question(tiny_tokenizer):
    alpaca, kwargs = get_template("alpaca"), {"max_length": 512, "caption_instruction": ""}
    with_system = encode(Example("x", TURNS, system=SYSTEM), tiny_tokenizer, alpaca, **kwargs)
    folded = ((f"{SYSTEM}\n\n{TURNS[0][0]}", TURNS[0][1]), TURNS[1])
    assert with_system == encode(Example("x", folded), tiny_tokenizer, alpaca, **kwargs)
