"""Progress bars for passing steps (reading a file, checking images, generating answers).

On a terminal such a bar disappears when done, so the log above it stays readable; written to a file or a
pipe, where nothing can be erased, it stays as a finished line instead, so the next message starts on a line
of its own rather than behind the bar's last state.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

Item = TypeVar("Item")


def passing_bar(iterable: Iterable[Item], **options: Any) -> tqdm:
    """`tqdm(iterable, **options)`, erased when done on a terminal, kept as one finished line elsewhere."""
    return tqdm(iterable, leave=not sys.stderr.isatty(), **options)
