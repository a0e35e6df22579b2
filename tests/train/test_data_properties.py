"""Property tests of the data readers: whatever bytes or JSON values a data file of any format holds,
reading it gives examples, or bad samples and DataErrors naming the file and its line or index; never
another exception."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmadapter.core.examples import DataError, Example
from mmadapter.train.readers import READERS, BadSample, read_examples
from tests.helpers.train_data import write_image

BOUNDED = settings(max_examples=60, deadline=None)

SCALARS = st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats() | st.text(max_size=12)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
#: Values for a string field: strings that matter to the readers, any string, anything at all.
TEXT = st.sampled_from(["what colour", "<image> what", "", "  "]) | st.text(max_size=12) | JSON
#: Image names inside, outside, missing, through a symlink out, and unusable as paths.
IMAGE = (
    st.sampled_from(["red.png", "sub/../red.png", "missing.png", "../red.png", "/etc/passwd", "link.png", "a\x00b"])
    | st.sampled_from([".", "", "x" * 300])
    | st.text(max_size=12)
    | JSON
)
MESSAGES = st.lists(
    st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "user", "assistant"]) | JSON, "value": TEXT})
    | JSON,
    max_size=4,
)
#: Rows shaped like each format's, with arbitrary values in their fields.
ROWS = {
    "alpaca": st.fixed_dictionaries({"instruction": TEXT, "output": TEXT}, optional={"input": TEXT}),
    "conversation": st.fixed_dictionaries({"conversations": MESSAGES | JSON}, optional={"image": IMAGE}),
    "caption-jsonl": st.fixed_dictionaries({"image": IMAGE, "caption": TEXT}),
    "chatglm": st.fixed_dictionaries(
        {"content": TEXT, "summary": TEXT}, optional={"history": st.lists(st.lists(TEXT, max_size=3)) | JSON}
    ),
}
IDS = st.integers(0, 3) | JSON
COCO = (
    st.fixed_dictionaries(
        {
            "images": st.lists(st.fixed_dictionaries({"id": IDS, "file_name": IMAGE}) | JSON, max_size=4) | JSON,
            "annotations": st.lists(st.fixed_dictionaries({"image_id": IDS, "caption": TEXT}) | JSON, max_size=4)
            | JSON,
        }
    )
    | JSON
)
#: Where a row is: `file:line`, `file[index]`, or COCO's `file annotations[index]`.
ROW = r"(:\d+|\[\d+\]| annotations\[\d+\])"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A data folder with an image and a symlink out of it."""
    root = tmp_path_factory.mktemp("property-data")
    write_image(root / "red.png", "red")
    (root / "link.png").symlink_to(write_image(root.parent / "outside.png", "blue"))
    return root


def lines_or_list(rows: list, as_list: bool, ascii: bool = True) -> bytes:
    text = json.dumps(rows, ensure_ascii=ascii) if as_list else "".join(json.dumps(r) + "\n" for r in rows)
    return text.encode("utf-8", "surrogatepass")


@st.composite
def file_bytes(draw) -> bytes:
    """Random bytes, or a JSON list or JSON-lines file with random bytes spliced in."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=300))
    data = lines_or_list(draw(st.lists(JSON, max_size=4)), draw(st.booleans()), draw(st.booleans()))
    at = draw(st.integers(0, len(data)))
    return data[:at] + draw(st.binary(min_size=1, max_size=4)) + data[at:]


def read(format: str, path, options=None) -> list[Example | BadSample]:
    """Every item read; each is an Example or BadSample whose source names the file and the row."""
    items = list(read_examples(format, path, options=options))
    for item in items:
        assert isinstance(item, Example | BadSample)
        assert re.fullmatch(re.escape(str(path)) + ROW, item.source), item.source
    return items


@BOUNDED
@given(data=file_bytes(), format=st.sampled_from(sorted(READERS)), suffix=st.sampled_from([".jsonl", ".json"]))
def test_any_bytes_give_examples_or_errors_naming_the_file(folder, data, format, suffix):
    path = folder / f"data{suffix}"
    path.write_bytes(data)
    try:
        read(format, path)
    except DataError as error:
        assert str(error).startswith(f"{path}: "), error


@BOUNDED
@given(data=st.data(), format=st.sampled_from(sorted(ROWS)), as_list=st.booleans())
def test_any_json_rows_give_one_example_or_bad_sample_each(folder, data, format, as_list):
    rows = data.draw(st.lists(ROWS[format] | JSON, max_size=5), label="rows")
    path = folder / ("rows.json" if as_list else "rows.jsonl")
    path.write_bytes(lines_or_list(rows, as_list))
    options = {"history_column": "history"} if format == "chatglm" and data.draw(st.booleans()) else None
    items = read(format, path, options)
    if format == "chatglm":  # official rule: rows with an empty prompt or response are dropped silently
        assert len(items) <= (1 if as_list else len(rows))
    else:
        assert len(items) == len(rows)


@BOUNDED
@given(document=COCO)
def test_any_coco_document_gives_examples_or_an_error_naming_the_file(folder, document):
    path = folder / "coco.json"
    path.write_bytes(json.dumps(document).encode())
    try:
        items = read("coco-captions", path)
    except DataError as error:
        assert str(error).startswith(f"{path}: not a COCO captions file"), error
        return
    assert len(items) == len(document["annotations"])
