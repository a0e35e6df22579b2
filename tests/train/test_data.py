"""Data: file formats, bad rows reported with file and line, response-only labels, padding, batch order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmadapter.core.encoding import IGNORE_INDEX, encode
from mmadapter.core.examples import DataError, Example
from mmadapter.core.templates import ALPACA_WITH_INPUT, get_template
from mmadapter.train.batching import epoch_batches, eval_batches, process_batches
from mmadapter.train.data import BadSampleLog, Collator, Sample, SupervisedDataset, load_samples
from mmadapter.train.readers import BadSample, parse_conversation, read_examples
from mmadapter.train.recipe import DataSection, DataSource
from mmadapter.vision.images import load_image
from tests.helpers.train_data import alpaca_rows, write_image, write_json, write_jsonl


def split(items):
    items = list(items)
    return [i for i in items if isinstance(i, Example)], [str(i) for i in items if isinstance(i, BadSample)]


def test_alpaca_jsonl_bad_rows_name_file_and_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(
        '{"instruction": "say red", "input": "", "output": "red"}\n'
        '{"instruction": "broken"\n'
        '{"instruction": "no output"}\n'
        "\n"
        '{"instruction": 7, "output": "x"}\n'
        '["not", "an", "object"]\n'
        '{"instruction": "say blue", "output": "blue"}\n'
    )
    good, bad = split(read_examples("alpaca", path))
    assert [e.turns for e in good] == [(("say red", "red"),), (("say blue", "blue"),)]
    assert good[0].source == f"{path}:1" and good[1].source == f"{path}:7"
    assert bad == [
        f"{path}:2: malformed JSON (Expecting ',' delimiter at column 25)",
        f"{path}:3: missing field 'output'",
        f"{path}:5: field 'instruction' must be a string, got int",
        f"{path}:6: expected a JSON object, got list",
    ]


def test_json_list_rows_are_indexed_and_a_broken_file_names_line_and_column(tmp_path):
    path = write_json(tmp_path / "a.json", [{"instruction": "q", "output": ""}, {"instruction": "q", "output": "a"}])
    good, bad = split(read_examples("alpaca", path))
    assert bad == [f"{path}[0]: field 'output' is empty"] and good[0].source == f"{path}[1]"
    path.write_text('[{"instruction": "q",\n "output": }]')
    with pytest.raises(DataError, match=r"a.json: invalid JSON at line 2 column 12"):
        list(read_examples("alpaca", path))
    with pytest.raises(DataError, match="missing.json: data file not found"):
        list(read_examples("alpaca", tmp_path / "missing.json"))


def test_conversations_caption_files_and_coco(tmp_path):
    write_image(tmp_path / "red.png", "red")
    rows = [
        {
            "image": "red.png",
            "conversations": [
                {"from": "human", "value": "<image>\nwhat colour"},
                {"from": "gpt", "value": "red"},
                {"from": "human", "value": "and the shape"},
                {"from": "gpt", "value": "square"},
            ],
        },
        {
            "image": "gone.png",
            "conversations": [{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "x"}],
        },
        {"conversations": [{"from": "gpt", "value": "first"}]},
        {"conversations": [{"from": "human", "value": "<image> what"}, {"from": "gpt", "value": "x"}]},
        {"conversations": [{"from": "human", "value": "unanswered"}]},
    ]
    good, bad = split(read_examples("conversation", write_json(tmp_path / "c.json", rows)))
    assert good[0].turns == (("what colour", "red"), ("and the shape", "square"))
    assert good[0].image == tmp_path / "red.png"
    assert bad == [
        f"{tmp_path}/c.json[1]: image not found: {tmp_path}/gone.png",
        f"{tmp_path}/c.json[2]: conversations[0]: expected a 'human' message, got 'gpt'",
        f"{tmp_path}/c.json[3]: a message contains <image> but the row has no 'image' field",
        f"{tmp_path}/c.json[4]: conversation ends with a human message (no reply to train on)",
    ]
    captions = write_jsonl(
        tmp_path / "cap.jsonl", [{"image": "red.png", "caption": "a red square"}, {"image": "red.png"}]
    )
    good, bad = split(read_examples("caption-jsonl", captions))
    assert good[0].caption and good[0].turns == (("", "a red square"),)
    assert bad == [f"{captions}:2: missing field 'caption'"]
    coco = {
        "images": [{"id": 1, "file_name": "red.png"}],
        "annotations": [{"image_id": 1, "caption": " a red square "}, {"image_id": 9, "caption": "lost"}],
    }
    good, bad = split(read_examples("coco-captions", write_json(tmp_path / "coco.json", coco), images=tmp_path))
    assert good[0].turns == (("", "a red square"),) and good[0].image == tmp_path / "red.png"
    assert bad == [f"{tmp_path}/coco.json annotations[1]: image_id 9 is not listed in 'images'"]


def test_alpaca_labels_match_the_official_masking(tiny_tokenizer):
    """Official alpaca_finetuning_v1: tokenize prompt and prompt+output (BOS first, EOS last), mask the prompt."""
    example = Example("x", (("what colour is the circle", "red"),), input="a red circle")
    encoded = encode(example, tiny_tokenizer, get_template("alpaca"), max_length=512, caption_instruction="")
    prompt = ALPACA_WITH_INPUT.format(instruction="what colour is the circle", input="a red circle")
    prompt_ids = [1] + tiny_tokenizer.encode(prompt, add_special_tokens=False)
    full_ids = [1] + tiny_tokenizer.encode(prompt + "red", add_special_tokens=False) + [2]
    assert encoded.input_ids == full_ids
    assert encoded.labels == [IGNORE_INDEX] * len(prompt_ids) + full_ids[len(prompt_ids) :]
    short = encode(
        example, tiny_tokenizer, get_template("alpaca"), max_length=len(prompt_ids) + 1, caption_instruction=""
    )
    assert short.input_ids == full_ids[: len(prompt_ids) + 1]
    with pytest.raises(DataError, match="no response tokens within max_length=10"):
        encode(example, tiny_tokenizer, get_template("alpaca"), max_length=10, caption_instruction="")


def test_multi_turn_labels_cover_every_reply_and_its_eos(tiny_tokenizer):
    turns = (("what colour", "red"), ("what shape", "a square"))
    encoded = encode(
        Example("x", turns), tiny_tokenizer, get_template("alpaca"), max_length=512, caption_instruction=""
    )
    spans, current = [], []
    for token, label in zip(encoded.input_ids, encoded.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    spans.append(current)
    assert [tiny_tokenizer.decode(s[:-1]) for s in spans] == ["red", "a square"]
    assert all(s[-1] == tiny_tokenizer.eos_token_id for s in spans)
    text = get_template("alpaca").render("what shape", history=[("what colour", "red")]) + "a square"
    without_eos = [t for i, t in enumerate(encoded.input_ids) if i == 0 or t != tiny_tokenizer.eos_token_id]
    assert tiny_tokenizer.decode(without_eos[1:]) == text


def test_caption_samples_use_the_caption_instruction(tiny_tokenizer):
    example = Example("x", (("", "a red square"),), caption=True)
    encoded = encode(example, tiny_tokenizer, get_template("alpaca"), max_length=512, caption_instruction="describe")
    first = encoded.labels.index(next(label for label in encoded.labels if label != IGNORE_INDEX))
    assert tiny_tokenizer.decode(encoded.input_ids[1:first]) == get_template("alpaca").render("describe")
    assert tiny_tokenizer.decode(encoded.input_ids[first:-1]) == "a red square"


def bad_file(tmp_path, good: int, bad: int):
    lines = [json.dumps(row) for row in alpaca_rows(good)] + ['{"instruction": "x"}'] * bad
    return DataSource(format="alpaca", path=str(write_jsonl(tmp_path / "mixed.jsonl", [json.loads(x) for x in lines])))


def test_skip_policy_counts_and_the_fraction_limit_stops(tmp_path, tiny_tokenizer):
    data = DataSection(template="chatglm", max_bad_fraction=0.2)
    log = BadSampleLog("skip", 0.2)
    samples = load_samples([bad_file(tmp_path, 9, 1)], tiny_tokenizer, data, [None], None, log, show_progress=False)
    assert len(samples) == 9 and len(log.samples) == 1 and log.upfront == 1
    assert log.summary() == f"skipped 1 bad sample(s):\n  {tmp_path}/mixed.jsonl:10: missing field 'output'"
    with pytest.raises(
        DataError, match=r"mixed.jsonl: 3 of 10 samples are bad \(30.0% > data.max_bad_fraction 20.0%\)"
    ):
        load_samples([bad_file(tmp_path, 7, 3)], tiny_tokenizer, data, [None], None, BadSampleLog("skip", 0.2))


def test_fail_policy_stops_at_the_first_bad_row(tmp_path, tiny_tokenizer):
    with pytest.raises(DataError, match=r"mixed.jsonl:10: missing field 'output' \(data.on_bad_sample=fail"):
        load_samples(
            [bad_file(tmp_path, 9, 1)],
            tiny_tokenizer,
            DataSection(template="chatglm"),
            [None],
            None,
            BadSampleLog("fail"),
            show_progress=False,
        )


def test_collator_pads_right_and_masks_samples_whose_image_fails(tmp_path, tiny_tokenizer):
    write_image(tmp_path / "red.png", "red")
    broken = write_image(tmp_path / "broken.png", "red")
    broken.write_bytes(broken.read_bytes()[:50])  # the header reads (checked up front), the pixels do not
    rows = [{"image": name, "caption": "a red square"} for name in ("red.png", "broken.png")]
    source = DataSource(format="caption-jsonl", path=str(write_jsonl(tmp_path / "c.jsonl", rows)))
    samples = load_samples(
        [source], tiny_tokenizer, DataSection(template="chatglm"), [None], None, BadSampleLog(), show_progress=False
    )

    def loader(path):
        return {"pixel_values": torch.ones(3, 4, 4) * (1 + len(load_image(path).getbands()))}

    dataset = SupervisedDataset(samples, loader)
    batch = Collator(pad_token_id=0)([dataset[1], dataset[0]])
    (bad,) = batch["bad"]
    assert bad.source == f"{tmp_path}/c.jsonl:2" and bad.reason.startswith(f"{tmp_path}/broken.png: corrupt")
    assert (batch["labels"][0] == IGNORE_INDEX).all()  # the bad sample stays in the batch without loss
    n = len(samples[0].input_ids)
    assert batch["labels"][1, :n].tolist() == samples[0].labels and batch["attention_mask"][1].sum() == n
    assert batch["image_mask"].tolist() == [False, True]
    assert (batch["pixel_values"][0] == 0).all() and (batch["pixel_values"][1] == 4).all()


def test_batch_order_depends_only_on_seed_epoch_and_the_global_step_size():
    lengths = [(i * 7) % 13 + 1 for i in range(40)]
    one = epoch_batches(lengths, batch_size=8, grad_accum=1, num_processes=1, seed=3, epoch=1, group_by_length=True)
    two = epoch_batches(lengths, batch_size=4, grad_accum=1, num_processes=2, seed=3, epoch=1, group_by_length=True)
    rank0, rank1 = process_batches(two, 0, 2), process_batches(two, 1, 2)
    assert [sorted(b) for b in one] == [sorted(a + b) for a, b in zip(rank0, rank1, strict=True)]
    again = epoch_batches(lengths, batch_size=8, grad_accum=1, num_processes=1, seed=3, epoch=1, group_by_length=True)
    other = epoch_batches(lengths, batch_size=8, grad_accum=1, num_processes=1, seed=3, epoch=2, group_by_length=True)
    assert one == again and one != other
    assert sorted(i for b in one for i in b) == list(range(40))
    uneven = epoch_batches(lengths, batch_size=6, grad_accum=1, num_processes=2, seed=0, epoch=0, group_by_length=False)
    assert len(uneven) == 6  # 7 batches cut to a multiple of the process count
    batches, padding = eval_batches(lengths[:9], 2, 2)
    assert len(batches) == 6 and padding == [False] * 5 + [True]


def test_generation_prompts_are_the_training_encoding_without_the_last_reply(tiny_tokenizer):
    """Evaluation asks a multi-turn question exactly as training showed it: EOS after each earlier reply."""
    from mmadapter.core.encoding import encode_prompt
    from mmadapter.train.evaluate import _prompt_and_reference

    template = get_template("alpaca")
    example = Example(source="chat.json[0]", turns=(("what shape is there", "a red circle"), ("is it small", "large")))
    trained = encode(example, tiny_tokenizer, template, max_length=4096, caption_instruction="").input_ids
    answer = tiny_tokenizer.encode("large", add_special_tokens=False)
    prompt = encode_prompt(example, tiny_tokenizer, template)
    assert trained == prompt + answer + [tiny_tokenizer.eos_token_id]
    assert prompt.count(tiny_tokenizer.eos_token_id) == 1
    source = DataSource(format="conversation", path="chat.json")
    assert _prompt_and_reference(example, tiny_tokenizer, DataSection(), source, template) == (prompt, "large")
    single = Example(source="a.json[0]", turns=(("name a colour", "red"),), input="one word")
    trained = encode(single, tiny_tokenizer, template, max_length=4096, caption_instruction="").input_ids
    assert trained[: -len(tiny_tokenizer.encode("red", add_special_tokens=False)) - 1] == encode_prompt(
        single, tiny_tokenizer, template
    )


def test_image_augmentation_is_fixed_per_seed_epoch_and_sample_and_leaves_the_global_generator_alone():
    samples = [Sample(f"s:{i}", [1, 2], [1, 2], Path(f"{i}.png"), 0) for i in range(3)]

    def loader(path):  # a random augmentation that draws from torch's global CPU generator, as torchvision's
        return {"pixel_values": torch.rand(4)}

    dataset = SupervisedDataset(samples, loader, seed=5)
    torch.manual_seed(0)
    expected_next = torch.rand(1)
    torch.manual_seed(0)
    first = [dataset[i]["image"]["pixel_values"] for i in range(3)]
    assert torch.equal(torch.rand(1), expected_next)  # the training generator did not move
    torch.manual_seed(123)
    assert all(torch.equal(dataset[i]["image"]["pixel_values"], first[i]) for i in (2, 0, 1))
    assert not torch.equal(first[0], first[1])
    torch.manual_seed((5 * 1_000_003 + 0) * 10_000_019 + 1)  # what the old fork_rng + manual_seed drew
    assert torch.equal(first[1], torch.rand(4))
    dataset.epoch = 1
    assert not torch.equal(dataset[0]["image"]["pixel_values"], first[0])
    assert torch.equal(SupervisedDataset(samples, loader, seed=5)[2]["image"]["pixel_values"], first[2])


@pytest.mark.parametrize(
    ("row", "says"),
    [
        ({"conversations": []}, "'conversations' is an empty list; expected a list of {from, value} messages"),
        ({"conversations": "hi"}, "'conversations' is a str; expected a list of {from, value} messages"),
        ({"conversations": [{"from": "human"}]}, "conversations[0]: missing field 'value'"),
        ({"chats": []}, "missing field 'conversations'"),
    ],
)
def test_a_bad_conversation_row_is_named_for_what_it_is(row, says):
    with pytest.raises(DataError) as error:
        parse_conversation("chats.jsonl:1", row, None)
    assert str(error.value).startswith(says)


def test_a_folder_given_as_a_data_file_is_named_as_a_folder(tmp_path):
    with pytest.raises(DataError, match="a folder, not a data file"):
        list(read_examples("alpaca", tmp_path))
