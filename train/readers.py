"""Training-data file formats, read into `Example`s; a bad row becomes a `BadSample` naming file and line.

Formats (spec llama-adapter.md §1.5, §3.6, §3.10; chatglm-6b-ptuning-v2.md §5.5):
- `alpaca`: JSON list or JSONL of {instruction, input?, output} (Stanford Alpaca, GPT-4-LLM).
- `conversation`: LLaVA-style JSON/JSONL {image?, conversations: [{from: human|gpt, value}, …]};
  `<image>` marks where the picture was, and is removed (the image enters as a visual prompt).
- `coco-captions`: COCO captions annotations JSON {images: [{id, file_name}], annotations: [{image_id, caption}]}.
- `caption-jsonl`: JSON list or JSONL of {image, caption}.
- `chatglm`: AdvertiseGen-style JSONL {content, summary} (columns configurable, optional history).

Reading never raises on a bad row: the caller applies the skip/fail policy. Only a file that cannot
be read at all (missing, or a JSON document that does not parse) raises a DataError.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mmadapter.core.examples import DataError, Example
from mmadapter.train.chatglm_data import ChatGLMDataConfig, read_rows

#: Roles accepted in conversation files, mapped to user / assistant.
USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")
IMAGE_TOKEN = "<image>"


@dataclasses.dataclass(frozen=True)
class BadSample:
    source: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


Row = tuple[str, Any]


def read_records(path: Path) -> Iterator[Row | BadSample]:
    """(location, parsed row) for a JSON list or a JSON-lines file; malformed lines become BadSamples."""
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".jsonl" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}") from None
        for index, row in enumerate(rows):
            yield f"{path}[{index}]", row
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{number}", json.loads(line)
        except json.JSONDecodeError as error:
            yield BadSample(f"{path}:{number}", f"malformed JSON ({error.msg} at column {error.colno})")


def _text(row: dict[str, Any], field: str, *, required: bool = True, default: str = "") -> str:
    """A string field; raises DataError (caught per row) naming what is wrong."""
    if field not in row or row[field] is None:
        if required:
            raise DataError(f"missing field {field!r}")
        return default
    value = row[field]
    if not isinstance(value, str):
        raise DataError(f"field {field!r} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise DataError(f"field {field!r} is empty")
    return value


def _object(row: Any) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object, got {type(row).__name__}")
    return row


def _image_path(name: str, images: Path) -> Path:
    path = images / name
    if not path.is_file():
        raise DataError(f"image not found: {path}")
    return path


def _parse_rows(
    path: Path, parse: Callable[[str, dict[str, Any]], Example], limit: int | None
) -> Iterator[Example | BadSample]:
    count = 0
    for item in read_records(path):
        if limit is not None and count >= limit:
            return
        count += 1
        if isinstance(item, BadSample):
            yield item
            continue
        location, row = item
        try:
            yield parse(location, _object(row))
        except DataError as error:
            yield BadSample(location, str(error))


def read_alpaca(path: Path, images: Path, options: dict[str, Any], limit: int | None = None):
    def parse(location: str, row: dict[str, Any]) -> Example:
        instruction, output = _text(row, "instruction"), _text(row, "output")
        return Example(location, ((instruction, output),), input=_text(row, "input", required=False))

    return _parse_rows(path, parse, limit)


def read_conversation(path: Path, images: Path, options: dict[str, Any], limit: int | None = None):
    def parse(location: str, row: dict[str, Any]) -> Example:
        messages = row.get("conversations")
        if not isinstance(messages, list) or not messages:
            raise DataError("missing field 'conversations' (a list of {from, value} messages)")
        turns, pending = [], None
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise DataError(f"conversations[{i}]: expected an object, got {type(message).__name__}")
            role = _text(message, "from")
            value = _text(message, "value").replace(IMAGE_TOKEN, "").strip()
            if pending is None and role in USER_ROLES:
                pending = value
            elif pending is not None and role in ASSISTANT_ROLES:
                turns.append((pending, value))
                pending = None
            else:
                expected = "human" if pending is None else "gpt"
                raise DataError(f"conversations[{i}]: expected a {expected!r} message, got {role!r}")
        if pending is not None:
            raise DataError("conversation ends with a human message (no reply to train on)")
        mentions_image = any(IMAGE_TOKEN in str(m.get("value", "")) for m in messages)
        image = row.get("image")
        if mentions_image and image is None:
            raise DataError(f"a message contains {IMAGE_TOKEN} but the row has no 'image' field")
        return Example(location, tuple(turns), image=_image_path(_text(row, "image"), images) if image else None)

    return _parse_rows(path, parse, limit)


def read_caption_jsonl(path: Path, images: Path, options: dict[str, Any], limit: int | None = None):
    def parse(location: str, row: dict[str, Any]) -> Example:
        caption = _text(row, "caption")
        return Example(location, (("", caption),), image=_image_path(_text(row, "image"), images), caption=True)

    return _parse_rows(path, parse, limit)


def read_coco_captions(
    path: Path, images: Path, options: dict[str, Any], limit: int | None = None
) -> Iterator[Example | BadSample]:
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}") from None
    if not isinstance(document, dict) or not isinstance(document.get("annotations"), list):
        raise DataError(f"{path}: not a COCO captions file (expected 'images' and 'annotations' lists)")
    files = {
        entry.get("id"): entry.get("file_name") for entry in document.get("images") or [] if isinstance(entry, dict)
    }
    for index, annotation in enumerate(document["annotations"][:limit]):
        location = f"{path} annotations[{index}]"
        try:
            annotation = _object(annotation)
            caption = _text(annotation, "caption").strip()
            if annotation.get("image_id") not in files:
                raise DataError(f"image_id {annotation.get('image_id')!r} is not listed in 'images'")
            image = _image_path(str(files[annotation["image_id"]]), images)
            yield Example(location, (("", caption),), image=image, caption=True)
        except DataError as error:
            yield BadSample(location, str(error))


def read_chatglm(path: Path, images: Path, options: dict[str, Any], limit: int | None = None):
    """AdvertiseGen-style rows, read by the official rules of train/chatglm_data.py (rows with an empty
    prompt or response are dropped silently, as ptuning/main.py does); options are its column settings."""

    allowed = {"prompt_column", "response_column", "history_column", "source_prefix", "ignore_pad_token_for_loss"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise DataError(f"{path}: unknown chatglm option(s) {unknown}; known: {sorted(allowed)}")
    pending: list[BadSample] = []
    rows = read_rows(
        path, ChatGLMDataConfig(**options), lambda e: pending.append(BadSample(f"{e.path}:{e.line}", e.reason))
    )
    count = 0
    for row in rows:
        yield from pending
        pending.clear()
        if limit is not None and count >= limit:
            return
        count += 1
        yield Example(row.source, (*row.history, (row.query, row.response)))
    yield from pending


READERS: dict[str, Callable[..., Iterator[Example | BadSample]]] = {
    "alpaca": read_alpaca,
    "conversation": read_conversation,
    "coco-captions": read_coco_captions,
    "caption-jsonl": read_caption_jsonl,
    "chatglm": read_chatglm,
}


def read_examples(
    format: str, path: str | Path, images: str | Path | None = None, options: dict[str, Any] | None = None, limit=None
) -> Iterator[Example | BadSample]:
    """Examples and bad samples of one data file; images resolve against `images` or the file's folder."""
    if format not in READERS:
        raise DataError(f"unknown data format {format!r}; available: {', '.join(READERS)}")
    path = Path(path)
    return READERS[format](path, Path(images) if images else path.parent, options or {}, limit)
