"""Training-data file formats, read into `Example`s; a bad row becomes a `BadSample` naming file and line.

Formats (spec llama-adapter.md §1.5, §3.6, §3.10; chatglm-6b-ptuning-v2.md §5.5):
- `alpaca`: JSON list or JSONL of {instruction, input?, output, system?} (Stanford Alpaca, GPT-4-LLM).
- `conversation`: LLaVA-style JSON/JSONL {image?, conversations: [{from: system?|human|gpt, value}, …]}
  (a system message comes first); `<image>` marks where the picture was, and is removed (the image enters
  as a visual prompt; a chat template that renders image parts puts its own marker in the first question).
- `coco-captions`: COCO captions annotations JSON {images: [{id, file_name}], annotations: [{image_id, caption}]}.
- `caption-jsonl`: JSON list or JSONL of {image, caption}.
- `chatglm`: AdvertiseGen-style JSONL {content, summary} (columns configurable, optional history).

Reading never raises on a bad row: the caller applies the skip/fail policy. JSON lines are decoded one
by one, so a stray non-UTF-8 byte costs its line, not the file. Only a file that cannot be read at all
(missing, or a JSON document that is not UTF-8 or does not parse) raises a DataError.

Image paths resolve inside the source's image folder (symlinks followed): a data file naming
`/etc/passwd` or `../../secret` gets a bad sample, not a read, unless the source allows it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mmadapter.core.examples import DataError, Example, check_encodable
from mmadapter.train.chatglm_data import ChatGLMDataConfig, ChatGLMRow, MalformedRowError, parse_row

#: Roles accepted in conversation files, mapped to system / user / assistant.
SYSTEM_ROLE = "system"
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
    data = _read_bytes(path)
    if path.suffix != ".jsonl" and data.lstrip().startswith(b"["):
        for index, row in enumerate(_parse_document(path, data)):
            yield f"{path}[{index}]", row
        return
    for item in _lines(path, data):
        yield item if isinstance(item, BadSample) else _parse_line(f"{path}:{item[0]}", item[1])


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        what = "a folder, not a data file (give the JSON/JSONL file in it)" if path.is_dir() else "data file not found"
        raise DataError(f"{path}: {what}")
    return path.read_bytes()


def _lines(path: Path, data: bytes) -> Iterator[tuple[int, str] | BadSample]:
    """(line number, text) of each non-blank line, each decoded on its own so that one bad byte is one bad line."""
    for number, raw in enumerate(data.splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            yield BadSample(f"{path}:{number}", _not_utf8(error, f"column {error.start + 1}"))
            continue
        if line.strip():
            yield number, line


def _not_utf8(error: UnicodeDecodeError, where: str) -> str:
    return f"not UTF-8 text (byte 0x{error.object[error.start]:02x} at {where}); save the file as UTF-8"


def _parse_line(location: str, line: str) -> Row | BadSample:
    try:
        return location, json.loads(line)
    except json.JSONDecodeError as error:
        return BadSample(location, f"malformed JSON ({error.msg} at column {error.colno})")
    except (ValueError, RecursionError) as error:  # an integer over Python's digit limit; nesting too deep
        return BadSample(location, f"malformed JSON ({error})")


def _parse_document(path: Path, data: bytes) -> Any:
    """A whole-file JSON document; one that is not UTF-8 or not JSON fails naming where."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DataError(f"{path}: {_not_utf8(error, f'byte offset {error.start}, line {line}')}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}") from None
    except (ValueError, RecursionError) as error:  # an integer over Python's digit limit; nesting too deep
        raise DataError(f"{path}: invalid JSON ({error})") from None


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
    check_encodable(value, field)
    return value


def _object(row: Any) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object, got {type(row).__name__}")
    return row


@dataclasses.dataclass(frozen=True)
class ImageRoot:
    """The folder a data file's image paths resolve in. A path leaving it (absolute, `..`, a symlink out)
    is refused unless allowed, so a data file cannot make training read arbitrary files."""

    folder: Path
    allow_outside: bool = False

    def resolve(self, name: str) -> Path:
        """The image file `name` names, symlinks resolved; DataError (a bad sample) if it is outside or missing.
        A path outside is refused before anything there is touched."""
        try:
            path = (self.folder / name).resolve()
            if not self.allow_outside and not path.is_relative_to(self.folder):
                raise DataError(
                    f"image path {name!r} resolves to {path}, outside the image folder {self.folder}; move the "
                    "image into that folder, point the data source's `images` at a folder holding it, or set "
                    "`allow_outside_root: true` on the data source"
                )
            if not path.is_file():
                raise DataError(f"image not found: {path}")
        except DataError:
            raise
        except (OSError, ValueError, RuntimeError) as error:  # a NUL byte, a name too long, a symlink loop
            reason = error.strerror if isinstance(error, OSError) and error.strerror else error
            raise DataError(f"image path {name!r} is not a usable path ({reason})") from None
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


def parse_alpaca(location: str, row: dict[str, Any], images: ImageRoot) -> Example:
    """One alpaca row; raises DataError naming what is wrong."""
    instruction, output = _text(row, "instruction"), _text(row, "output")
    system = _text(row, "system", required=False)
    return Example(location, ((instruction, output),), input=_text(row, "input", required=False), system=system)


def read_alpaca(path: Path, images: ImageRoot, options: dict[str, Any], limit: int | None = None):
    return _parse_rows(path, functools.partial(parse_alpaca, images=images), limit)


def read_conversation(path: Path, images: ImageRoot, options: dict[str, Any], limit: int | None = None):
    return _parse_rows(path, functools.partial(parse_conversation, images=images), limit)


def parse_conversation(location: str, row: dict[str, Any], images: ImageRoot) -> Example:
    """One LLaVA-style conversation row; raises DataError naming what is wrong."""
    if "conversations" not in row:
        raise DataError("missing field 'conversations' (a list of {from, value} messages)")
    messages = row["conversations"]
    if not isinstance(messages, list) or not messages:
        shown = "an empty list" if messages == [] else f"a {type(messages).__name__}"
        raise DataError(f"'conversations' is {shown}; expected a list of {{from, value}} messages")
    turns, pending, system = [], None, ""
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"conversations[{i}]: expected an object, got {type(message).__name__}")
        try:
            role = _text(message, "from")
            value = _text(message, "value").replace(IMAGE_TOKEN, "").strip()
        except DataError as error:
            raise DataError(f"conversations[{i}]: {error}") from error
        if i == 0 and role == SYSTEM_ROLE:
            system = value
        elif pending is None and role in USER_ROLES:
            pending = value
        elif pending is not None and role in ASSISTANT_ROLES:
            turns.append((pending, value))
            pending = None
        else:
            expected = "human" if pending is None else "gpt"
            only_first = " (a system message comes first or not at all)" if role == SYSTEM_ROLE else ""
            raise DataError(f"conversations[{i}]: expected a {expected!r} message, got {role!r}{only_first}")
    if pending is not None:
        raise DataError("conversation ends with a human message (no reply to train on)")
    mentions_image = any(IMAGE_TOKEN in str(m.get("value", "")) for m in messages)
    image = row.get("image")
    if mentions_image and image is None:
        raise DataError(f"a message contains {IMAGE_TOKEN} but the row has no 'image' field")
    image_path = images.resolve(_text(row, "image")) if image else None
    return Example(location, tuple(turns), image=image_path, system=system)


def parse_caption(location: str, row: dict[str, Any], images: ImageRoot) -> Example:
    """One {image, caption} row; raises DataError naming what is wrong."""
    caption = _text(row, "caption")
    return Example(location, (("", caption),), image=images.resolve(_text(row, "image")), caption=True)


def read_caption_jsonl(path: Path, images: ImageRoot, options: dict[str, Any], limit: int | None = None):
    return _parse_rows(path, functools.partial(parse_caption, images=images), limit)


def read_coco_captions(
    path: Path, images: ImageRoot, options: dict[str, Any], limit: int | None = None
) -> Iterator[Example | BadSample]:
    document = _parse_document(path, _read_bytes(path))
    if not isinstance(document, dict) or not all(isinstance(document.get(k), list) for k in ("images", "annotations")):
        raise DataError(f"{path}: not a COCO captions file (expected 'images' and 'annotations' lists)")
    entries = {
        entry["id"]: entry for entry in document["images"] if isinstance(entry, dict) and _is_id(entry.get("id"))
    }
    for index, annotation in enumerate(document["annotations"][:limit]):
        location = f"{path} annotations[{index}]"
        try:
            yield _coco_example(location, _object(annotation), entries, images)
        except DataError as error:
            yield BadSample(location, str(error))


def _is_id(value: Any) -> bool:
    """COCO ids are numbers or strings; anything else (a list, an object) cannot name an image."""
    return isinstance(value, int | str)


def _coco_example(location: str, annotation: dict[str, Any], entries: dict[Any, dict], images: ImageRoot) -> Example:
    caption = _text(annotation, "caption").strip()
    image_id = annotation.get("image_id")
    if not _is_id(image_id):
        raise DataError(f"field 'image_id' must be a number or a string, got {type(image_id).__name__}")
    if image_id not in entries:
        raise DataError(f"image_id {image_id!r} is not listed in 'images'")
    return Example(
        location, (("", caption),), image=images.resolve(_text(entries[image_id], "file_name")), caption=True
    )


def read_chatglm(path: Path, images: ImageRoot, options: dict[str, Any], limit: int | None = None):
    """AdvertiseGen-style rows, read by the official rules of train/chatglm_data.py (rows with an empty
    prompt or response are dropped silently, as ptuning/main.py does); options are its column settings."""

    allowed = {"prompt_column", "response_column", "history_column", "source_prefix", "ignore_pad_token_for_loss"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise DataError(f"{path}: unknown chatglm option(s) {unknown}; known: {sorted(allowed)}")
    config, count = ChatGLMDataConfig(**options), 0
    for item in _lines(path, _read_bytes(path)):
        if isinstance(item, BadSample):
            yield item
            continue
        if limit is not None and count >= limit:
            return
        row = _chatglm_row(path, *item, config)
        if isinstance(row, BadSample):
            yield row
        elif row is not None:
            count += 1
            yield Example(row.source, (*row.history, (row.query, row.response)))


def _chatglm_row(path: Path, number: int, line: str, config: ChatGLMDataConfig) -> ChatGLMRow | BadSample | None:
    try:
        return parse_row(line, config, path, number)
    except MalformedRowError as error:
        return BadSample(f"{path}:{number}", error.reason)
    except (ValueError, RecursionError) as error:  # from json.loads: an integer over Python's digit limit, nesting
        return BadSample(f"{path}:{number}", f"invalid JSON ({error})")


#: The row parsers of the formats whose files hold one example per row (location, row, images) -> Example;
#: also what reads those formats from Parquet (train/streaming.py).
ROW_PARSERS: dict[str, Callable[[str, dict[str, Any], ImageRoot], Example]] = {
    "alpaca": parse_alpaca,
    "conversation": parse_conversation,
    "caption-jsonl": parse_caption,
}

READERS: dict[str, Callable[..., Iterator[Example | BadSample]]] = {
    "alpaca": read_alpaca,
    "conversation": read_conversation,
    "coco-captions": read_coco_captions,
    "caption-jsonl": read_caption_jsonl,
    "chatglm": read_chatglm,
}


def read_examples(
    format: str,
    path: str | Path,
    images: str | Path | None = None,
    options: dict[str, Any] | None = None,
    limit=None,
    *,
    allow_outside_root: bool = False,
) -> Iterator[Example | BadSample]:
    """Examples and bad samples of one data file; image paths must resolve inside `images` (default: the
    file's folder) unless `allow_outside_root`."""
    if format not in READERS:
        raise DataError(f"unknown data format {format!r}; available: {', '.join(READERS)}")
    path = Path(path)
    root = ImageRoot(Path(images or path.parent).resolve(), allow_outside_root)
    return READERS[format](path, root, options or {}, limit)
