"""A training or chat example before tokenization, shared by training data, evaluation and serving."""

from __future__ import annotations

import dataclasses
from pathlib import Path


class DataError(ValueError):
    """A data file or sample that training cannot use; the message names the file and line or index."""


@dataclasses.dataclass(frozen=True)
class ImageBytes:
    """An image stored inside a data shard (a WebDataset-style tar member) rather than as a file of its own."""

    name: str
    """Where it is, for errors: `shard.tar[000012.jpg]`."""
    data: bytes = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True)
class Example:
    """One training sample before tokenization."""

    source: str
    """Where it came from: `file.jsonl:12` (line) or `file.json[11]` (index in a JSON list)."""
    turns: tuple[tuple[str, str], ...]
    """(user message, assistant reply) pairs; one pair for single-turn data."""
    input: str = ""
    """Alpaca's optional input of a single-turn instruction."""
    image: Path | ImageBytes | None = None
    caption: bool = False
    """A caption sample: rendered with the caption instruction, trains the caption stage in mixed runs."""
    system: str = ""
    """A system message: a chat template's system turn; the official templates put it before the first question."""


def check_encodable(value: str, field: str) -> None:
    """Refuse a string no tokenizer can encode: JSON may spell half a UTF-16 pair ("\\ud800")."""
    if value.isascii():
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise DataError(f"field {field!r} holds a lone surrogate ({value[error.start]!a}), not text") from None
