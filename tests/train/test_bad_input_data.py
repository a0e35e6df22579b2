"""Bad input in training data, caught before the first step with file and line: a stray non-UTF-8 byte,
unusable or oversized images, image paths leaving the image folder, a misspelt top-level recipe key."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from mmadapter.adapters.backbones.presets import base_config, build_base_model
from mmadapter.adapters.methods.base import attach_adapter, make_config
from mmadapter.core.examples import DataError, Example
from mmadapter.train.data import BadSampleLog, load_samples
from mmadapter.train.loop import train
from mmadapter.train.readers import BadSample, read_examples
from mmadapter.train.recipe import DataSection, DataSource, parse_recipe, recipe_schema
from mmadapter.vision.images import check_image_header
from tests.helpers.tiny_recipe import TINY_ADAPTERS
from tests.helpers.train_data import write_image, write_jsonl

ROWS = {
    "alpaca": {"instruction": "what colour", "output": "red"},
    "chatglm": {"content": "what colour", "summary": "red"},
    "conversation": {"conversations": [{"from": "human", "value": "what colour"}, {"from": "gpt", "value": "red"}]},
}
LATIN1 = "caf\xe9".encode("latin-1")  # "café" as a Windows editor may save it


def split(items):
    items = list(items)
    return [i for i in items if isinstance(i, Example)], [str(i) for i in items if isinstance(i, BadSample)]


def load(sources, tokenizer, policy="skip"):
    log = BadSampleLog(policy, max_fraction=1.0)
    data = DataSection(template="chatglm")
    return load_samples(sources, tokenizer, data, [None], None, log, show_progress=False), log


# ---------------------------------------------------------------- 1. one non-UTF-8 byte


@pytest.mark.parametrize("format", sorted(ROWS))
def test_a_non_utf8_byte_costs_its_line_and_names_it(tmp_path, format):
    good = json.dumps(ROWS[format]).encode()
    bad = good.replace(b"what", LATIN1)
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join([good, bad, good]) + b"\n")
    examples, bad_samples = split(read_examples(format, path))
    assert [e.source for e in examples] == [f"{path}:1", f"{path}:3"]
    column = bad.index(b"\xe9") + 1
    assert bad_samples == [f"{path}:2: not UTF-8 text (byte 0xe9 at column {column}); save the file as UTF-8"]


def test_a_non_utf8_line_fails_under_the_fail_policy_naming_it(tmp_path, tiny_tokenizer):
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps(ROWS["alpaca"]).encode().replace(b"what", LATIN1) + b"\n")
    with pytest.raises(DataError, match=rf"^{path}:1: not UTF-8 text \(byte 0xe9 .*on_bad_sample=fail"):
        load([DataSource(format="alpaca", path=str(path))], tiny_tokenizer, policy="fail")


@pytest.mark.parametrize(
    ("format", "document"),
    [("alpaca", [{"instruction": "what", "output": "red"}]), ("coco-captions", {"images": [], "annotations": []})],
)
def test_a_json_document_that_is_not_utf8_names_file_and_byte_offset(tmp_path, format, document):
    text = json.dumps(document, indent=1).encode()
    data = text.replace(b"[]", LATIN1) if format == "coco-captions" else text.replace(b"what", LATIN1)
    path = tmp_path / "data.json"
    path.write_bytes(data)
    offset, line = data.index(b"\xe9"), data[: data.index(b"\xe9")].count(b"\n") + 1
    expected = f"{path}: not UTF-8 text (byte 0xe9 at byte offset {offset}, line {line}); save the file as UTF-8"
    with pytest.raises(DataError) as error:
        list(read_examples(format, path))
    assert str(error.value) == expected


# ---------------------------------------------------------------- 2. images checked before the first step


@pytest.fixture
def images(tmp_path):
    """A folder with a good image, one over the 64-megapixel limit (small on disk) and a text file named .png."""
    folder = tmp_path / "images"
    folder.mkdir()
    write_image(folder / "red.png", "red")
    Image.new("1", (8001, 8000)).save(folder / "huge.png")
    (folder / "text.png").write_text("not an image")
    return folder


def captions(tmp_path, images, names):
    rows = [{"image": name, "caption": "a red square"} for name in names]
    path = write_jsonl(tmp_path / "captions.jsonl", rows)
    return DataSource(format="caption-jsonl", path=str(path), images=str(images))


def test_fail_stops_at_an_oversized_image_before_any_compute(tmp_path, images, tiny_tokenizer):
    source = captions(tmp_path, images, ["red.png", "huge.png"])
    message = (
        rf"captions.jsonl:2: {images}/huge.png: 8001x8000 pixels exceeds the limit of 64,000,000 pixels "
        r"\(data.on_bad_sample=fail"
    )
    with pytest.raises(DataError, match=message):
        load([source], tiny_tokenizer, policy="fail")


def test_skip_reports_every_bad_image_up_front_reading_each_header_once(tmp_path, images, tiny_tokenizer, monkeypatch):
    reads = []
    monkeypatch.setattr(
        "mmadapter.train.data.check_image_header", lambda path: reads.append(path) or check_image_header(path)
    )
    source = captions(tmp_path, images, ["red.png", "huge.png", "text.png", "red.png", "huge.png"])
    samples, log = load([source], tiny_tokenizer)
    assert [s.source for s in samples] == [f"{source.path}:1", f"{source.path}:4"]
    assert [str(b) for b in log.samples] == [
        f"{source.path}:2: {images}/huge.png: 8001x8000 pixels exceeds the limit of 64,000,000 pixels",
        f"{source.path}:3: {images}/text.png: not a supported image (JPEG, PNG, WEBP, GIF, BMP, TIFF)",
        f"{source.path}:5: {images}/huge.png: 8001x8000 pixels exceeds the limit of 64,000,000 pixels",
    ]
    assert log.upfront == 3
    assert sorted(reads) == [images / "huge.png", images / "red.png", images / "text.png"]


def v2_recipe(make_recipe, tmp_path, images, policy):
    rows = [{"image": "red.png", "caption": "a red square"}] * 7 + [{"image": "text.png", "caption": "a square"}]
    path = write_jsonl(tmp_path / "captions.jsonl", rows)
    return make_recipe(
        data=[{"format": "caption-jsonl", "path": str(path), "images": str(images)}],
        method="llama-adapter-v2",
        train={"max_steps": 1},
        data_options={"on_bad_sample": policy, "max_bad_fraction": 0.5},
        stages=[{"name": "caption", "trains": "caption"}],
    )


def test_a_v2_run_skips_an_unreadable_image_up_front_not_mid_training(make_recipe, tmp_path, images):
    summary = train(v2_recipe(make_recipe, tmp_path, images, "skip")).summary["stages"][0]
    assert summary["bad_samples"]["skipped"] == 1 and summary["bad_samples"]["masked_during_training"] == 0
    assert "captions.jsonl:8" in summary["bad_samples"]["examples"][0]


def test_a_v2_run_fails_on_an_unreadable_image_before_the_first_forward(make_recipe, tmp_path, images):
    model = attach_adapter(
        build_base_model(base_config("tiny-llama")),
        make_config("llama-adapter-v2", **TINY_ADAPTERS["llama-adapter-v2"]),
    )
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    with pytest.raises(DataError, match=r"captions.jsonl:8: .*text.png: not a supported image"):
        train(v2_recipe(make_recipe, tmp_path, images, "fail"), model=model)
    assert forwards == []


# ---------------------------------------------------------------- 3. image paths stay inside the image folder


@pytest.fixture
def confined(tmp_path):
    """data/ with red.png and a symlink out to outside/blue.png; a caption file naming paths in and out."""
    data, outside = tmp_path / "data", tmp_path / "outside"
    data.mkdir(), outside.mkdir()
    write_image(data / "red.png", "red")
    write_image(outside / "blue.png", "blue")
    (data / "link.png").symlink_to(outside / "blue.png")
    up = "../" * 40  # more than the folder is deep: reaches /
    names = ["red.png", "/etc/passwd", f"{up}etc/passwd", "../outside/blue.png", "link.png", "sub/../red.png"]
    rows = [{"image": name, "caption": "a square"} for name in names]
    return write_jsonl(data / "captions.jsonl", rows), data, outside


def test_image_paths_outside_the_image_folder_are_refused_naming_file_line_and_path(confined):
    path, data, outside = confined
    examples, bad = split(read_examples("caption-jsonl", path))
    assert [(e.source, e.image) for e in examples] == [(f"{path}:1", data / "red.png"), (f"{path}:6", data / "red.png")]
    how = "or set `allow_outside_root: true` on the data source"
    expected = [
        (2, "/etc/passwd", "/etc/passwd"),
        (3, f"{'../' * 40}etc/passwd", "/etc/passwd"),
        (4, "../outside/blue.png", outside / "blue.png"),
        (5, "link.png", outside / "blue.png"),
    ]
    assert len(bad) == len(expected)
    for message, (line, name, target) in zip(bad, expected, strict=True):
        assert message.startswith(f"{path}:{line}: image path {name!r} resolves to {target}, outside the image ")
        assert f"folder {data};" in message and message.endswith(how)


def test_the_fail_policy_stops_at_a_path_outside_before_opening_it(confined, tiny_tokenizer, monkeypatch):
    path, data, outside = confined
    monkeypatch.setattr("mmadapter.train.data.check_image_header", lambda image: pytest.fail(f"opened {image}"))
    path.write_text(json.dumps({"image": "/etc/passwd", "caption": "x"}) + "\n")
    with pytest.raises(DataError, match=r"captions.jsonl:1: image path '/etc/passwd' resolves to /etc/passwd"):
        load([DataSource(format="caption-jsonl", path=str(path))], tiny_tokenizer, policy="fail")


def test_allow_outside_root_lets_a_trusted_source_reach_out(confined, tiny_tokenizer):
    path, data, outside = confined
    source = DataSource(format="caption-jsonl", path=str(path), allow_outside_root=True)
    samples, log = load([source], tiny_tokenizer)
    lines = {s.source.rsplit(":", 1)[1]: s.image for s in samples}
    assert lines == {"1": data / "red.png", "4": outside / "blue.png", "5": outside / "blue.png", "6": data / "red.png"}
    assert [str(b).split(": ", 1)[0] for b in log.samples] == [f"{path}:2", f"{path}:3"]  # allowed, but not an image


def test_allow_outside_root_is_a_documented_recipe_field(make_recipe):
    document = make_recipe(parsed=False)
    document["data"]["train"][0]["allow_outside_root"] = True
    assert parse_recipe(document).stages[0].data.train[0].allow_outside_root is True
    field = recipe_schema()["$defs"]["DataSource"]["properties"]["allow_outside_root"]
    assert (
        field["type"] == "boolean" and field["default"] is False and "outside the image folder" in field["description"]
    )
    document["data"]["train"][0]["allow_outside_root"] = "yes"
    with pytest.raises(ValueError, match=r"data.train.0.allow_outside_root: expected true or false"):
        parse_recipe(document)


# ---------------------------------------------------------------- 4. unknown top-level recipe keys


def test_an_unknown_top_level_key_lists_the_stage_defaults_too(make_recipe):
    document = make_recipe(parsed=False, trian={"lr": 0.1})
    with pytest.raises(ValueError) as error:
        parse_recipe(document)
    assert (
        str(error.value) == "trian: unknown key 'trian' (known: model, adapter, stages, output_dir, name, train, data)"
    )


@pytest.mark.parametrize("format", sorted(ROWS))
def test_a_lone_surrogate_costs_its_line_and_names_it(tmp_path, format):
    """JSON may spell half a UTF-16 pair ("\\ud800"); no tokenizer can encode it, so it is a bad row, named."""
    good = json.dumps(ROWS[format])
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join([good, good.replace("what", "\\ud800what"), good]) + "\n")
    examples, bad_samples = split(read_examples(format, path))
    assert [e.source for e in examples] == [f"{path}:1", f"{path}:3"]
    assert len(bad_samples) == 1 and bad_samples[0].startswith(f"{path}:2: ")
    assert "lone surrogate ('\\ud800')" in bad_samples[0]
