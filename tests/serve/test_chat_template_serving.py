"""Serving with a chat template: the prompt is apply_chat_template(add_generation_prompt=True), with the template
the adapter folder recorded."""

from __future__ import annotations

import pytest

from mmadapter.adapters import attach_adapter, make_config, save_adapter
from mmadapter.adapters.io.adapter_folder import inspect_adapter_folder
from mmadapter.adapters.io.checkpoint import read_adapter_config
from mmadapter.adapters.io.model_card import build_model_card
from mmadapter.serve.chat import ChatTurn, prompt_ids, stream_turn
from mmadapter.serve.loader import ServedModel, load_served_model
from mmadapter.serve.prompting import encode_chat
from mmadapter.serve.sampling import SamplingParams
from tests.helpers.chat_tokenizer import CHATML_TEMPLATE, LLAMA3_TEMPLATE, build_chat_tokenizer

HISTORY = (("what colour is the circle", "red"),)
QUESTION = "what shape is left"
SYSTEM = "you are helpful"


def asked(system: str = "", image: bool = False) -> list[dict]:
    first = [{"type": "image"}, {"type": "text", "text": HISTORY[0][0]}] if image else HISTORY[0][0]
    messages = [{"role": "system", "content": system}] if system else []
    return [
        *messages,
        {"role": "user", "content": first},
        {"role": "assistant", "content": HISTORY[0][1]},
        {"role": "user", "content": QUESTION},
    ]


@pytest.fixture
def v1_base(tiny_llama):
    model = tiny_llama()
    attach_adapter(model, make_config("llama-adapter-v1", adapted_layers=2, prompt_length=3))
    return model


@pytest.mark.parametrize("template", [LLAMA3_TEMPLATE, CHATML_TEMPLATE], ids=["llama3", "chatml"])
@pytest.mark.parametrize("system", ["", SYSTEM])
def test_served_prompt_is_the_generation_prompt_of_apply_chat_template(v1_base, template, system):
    tokenizer = build_chat_tokenizer(template)
    served = ServedModel.from_model(v1_base, tokenizer, template="chat")
    ids = encode_chat(tokenizer, "llama", served.template, QUESTION, HISTORY, system=system)
    assert ids == tokenizer.apply_chat_template(asked(system), add_generation_prompt=True, return_dict=False)
    with_image = encode_chat(tokenizer, "llama", served.template, QUESTION, HISTORY, image=True)
    image_parts = template == LLAMA3_TEMPLATE  # the Llama-3.2-Vision-like template renders {"type": "image"}
    expected = tokenizer.apply_chat_template(asked(image=image_parts), add_generation_prompt=True, return_dict=False)
    assert with_image == expected


def test_the_served_template_is_the_one_the_adapter_folder_recorded(v1_base, tiny_llama, tmp_path):
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    build_chat_tokenizer(CHATML_TEMPLATE).save_pretrained(base)  # the base's own template differs from the record
    folder = save_adapter(v1_base, tmp_path / "adapter", prompt_template="chat", chat_template=LLAMA3_TEMPLATE)
    served = load_served_model(base, folder, device="cpu")
    assert served.template.source == LLAMA3_TEMPLATE and served.template.end_of_turn == "<|eot_id|>"
    end_of_turn = served.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert served.template.stop_token_ids == (end_of_turn,)
    assert end_of_turn in served.defaults.stop_token_ids  # every front end's sampling settings start from these
    ids = encode_chat(served.tokenizer, "llama", served.template, QUESTION, HISTORY)
    kwargs = {"chat_template": LLAMA3_TEMPLATE, "add_generation_prompt": True, "return_dict": False}
    assert ids == served.tokenizer.apply_chat_template(asked(), **kwargs)
    # `--template` still overrides the record; `auto` takes the recorded chat template.
    assert load_served_model(base, folder, template="alpaca", device="cpu").template.name == "alpaca"
    assert load_served_model(base, folder, template="auto", device="cpu").template.source == LLAMA3_TEMPLATE


def test_the_base_id_beside_adapters_is_asked_with_the_default_adapters_template(v1_base, tiny_llama, tmp_path):
    """Comparing an adapter with `base` over the API compares answers to the same prompt (was: base in Alpaca)."""
    from mmadapter.serve.loader import BASE_MODEL_ID, load_served_models

    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    build_chat_tokenizer(CHATML_TEMPLATE).save_pretrained(base)
    folder = save_adapter(v1_base, tmp_path / "adapter", prompt_template="chat", chat_template=LLAMA3_TEMPLATE)
    served = load_served_models(base, {"chat": folder}, device="cpu")
    assert list(load_served_models(base, {}, device="cpu").variants) == [BASE_MODEL_ID]  # the base alone, too
    turn = ChatTurn(QUESTION, HISTORY)
    as_base = ChatTurn(QUESTION, HISTORY, adapter=BASE_MODEL_ID)
    assert served.variant(BASE_MODEL_ID).template.source == LLAMA3_TEMPLATE
    assert prompt_ids(served, as_base) == prompt_ids(served, turn)
    end_of_turn = served.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert end_of_turn in served.variant(BASE_MODEL_ID).defaults.stop_token_ids


def test_without_a_base_the_recorded_one_is_loaded(tiny_llama, tmp_path):
    """As `mmadapter chat`/`serve` without --base: the Python API reads the base the adapter recorded."""
    from mmadapter.adapters import load_base_model

    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    build_chat_tokenizer(LLAMA3_TEMPLATE).save_pretrained(base)
    model = load_base_model(base)
    attach_adapter(model, make_config("llama-adapter-v1", adapted_layers=2, prompt_length=3))
    folder = save_adapter(model, tmp_path / "adapter", prompt_template="chat", chat_template=LLAMA3_TEMPLATE)
    served = load_served_model(None, folder, device="cpu")
    assert served.model.config.name_or_path == str(base) and served.template.source == LLAMA3_TEMPLATE
    with pytest.raises(ValueError, match="base: give the base model .* no adapter to read it from"):
        load_served_model(None)
    base.rename(tmp_path / "moved")
    with pytest.raises(ValueError, match=r"records base '.*base', which is not here; pass the base folder"):
        load_served_model(None, folder, device="cpu")


def test_folders_without_a_record_and_bare_bases_keep_the_official_template(v1_base, tiny_llama, tmp_path):
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    build_chat_tokenizer(LLAMA3_TEMPLATE).save_pretrained(base)
    old = save_adapter(v1_base, tmp_path / "old", prompt_template=None)
    assert load_served_model(base, old, device="cpu").template.name == "alpaca"
    assert load_served_model(base, device="cpu").template.name == "alpaca"
    assert load_served_model(base, device="cpu", template="auto").template.source == LLAMA3_TEMPLATE


def test_the_record_is_checked_when_read_and_described_in_the_model_card(v1_base, tmp_path):
    folder = save_adapter(v1_base, tmp_path / "adapter", prompt_template="chat", chat_template=LLAMA3_TEMPLATE)
    described = inspect_adapter_folder(folder)
    assert (described.prompt_template, described.chat_template) == ("chat", LLAMA3_TEMPLATE)
    assert "tokenizer chat template recorded in `mmadapter_config.json`" in str(build_model_card(described))
    config = folder / "mmadapter_config.json"
    config.write_text(config.read_text().replace('"prompt_template": "chat"', '"prompt_template": "chatml"'))
    with pytest.raises(ValueError, match=r"mmadapter_config.json: prompt_template: expected one of alpaca, .*chat"):
        read_adapter_config(folder)


def test_a_chat_turn_is_asked_with_the_template_and_ends_at_its_end_of_turn_token(v1_base):
    """The front ends' one path (serve/chat.py): system slot, prompt ids, and the end-of-turn token as a stop."""
    tokenizer = build_chat_tokenizer(LLAMA3_TEMPLATE)
    served = ServedModel.from_model(v1_base, tokenizer, template="chat")
    turn = ChatTurn(QUESTION, HISTORY, system=SYSTEM, params=SamplingParams(max_new_tokens=5, temperature=0.0))
    expected = tokenizer.apply_chat_template(asked(SYSTEM), add_generation_prompt=True, return_dict=False)
    assert prompt_ids(served, turn) == expected
    end_of_turn = tokenizer.convert_tokens_to_ids("<|eot_id|>")

    def answer_ends_now(module, inputs, logits):  # greedy picks <|eot_id|> first
        logits[..., end_of_turn] += 1e4

    v1_base.lm_head.register_forward_hook(answer_ends_now)
    *_, last = stream_turn(served, turn)
    assert (last.finish_reason, last.completion_tokens) == ("stop", 1)
