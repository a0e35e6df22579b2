"""Streaming detokenization and stop strings, and prompt ids that match training's."""

from __future__ import annotations

from mmadapter.core.encoding import encode
from mmadapter.core.examples import Example
from mmadapter.core.templates import get_template
from mmadapter.serve.prompting import encode_chat, encode_text
from mmadapter.serve.text_stream import IncrementalDecoder, StopStringFilter


def test_incremental_decoding_equals_decoding_everything(tiny_tokenizer):
    text = "the red circle — café 你好 is on the left"
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    decoder = IncrementalDecoder(tiny_tokenizer)
    pieces = [decoder.push(token) for token in ids] + [decoder.flush()]
    assert "".join(pieces) == tiny_tokenizer.decode(ids) == text
    # Multi-byte characters are several byte-level tokens: nothing half-decoded is ever emitted.
    assert all("\ufffd" not in piece for piece in pieces)
    assert len(ids) > len([p for p in pieces if p])


def test_stop_string_split_over_pushes_is_held_back_then_cut():
    stops = StopStringFilter(["### Instruction:"])
    shown = [stops.push(piece) for piece in ("a circle\n\n#", "## Ins", "truction: more")]
    assert shown == ["a circle\n\n", "", ""]
    assert stops.stopped and stops.text == "a circle\n\n"


def test_held_back_text_is_released_when_it_stops_matching_or_at_the_end():
    stops = StopStringFilter(["STOP"])
    assert stops.push("go ST") == "go "
    assert stops.push("ay") == "STay"
    assert stops.push(" S") == " "
    assert stops.flush() == "S"
    assert not stops.stopped


def test_multi_turn_prompt_ids_equal_the_training_encoding(tiny_tokenizer):
    template = get_template("alpaca")
    history = [("what shape is there", "a red circle"), ("what colour", "red")]
    question = "is it small"
    served = encode_chat(tiny_tokenizer, "llama", template, question, history)
    example = Example(source="test", turns=(*history, (question, "large")))
    trained = encode(example, tiny_tokenizer, template, max_length=4096, caption_instruction="").input_ids
    answer = tiny_tokenizer.encode("large", add_special_tokens=False)
    # Training ids = prompt ids + answer + EOS; the served prompt is exactly that prefix.
    assert trained == served + answer + [tiny_tokenizer.eos_token_id]
    assert served.count(tiny_tokenizer.eos_token_id) == len(history)
    assert encode_chat(tiny_tokenizer, "llama", template, question) == encode_text(
        tiny_tokenizer, "llama", template.render(question)
    )
