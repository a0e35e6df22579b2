"""The strength (a request's `adapter_scale`) at which the adapter module running now applies its change.

A context variable rather than an argument: the adapter terms act inside hooks and attention functions
that transformers calls with its own arguments. Outside a routed row group it is 1 (the adapter as trained).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

_STRENGTH: contextvars.ContextVar[float] = contextvars.ContextVar("mmadapter_strength", default=1.0)


def current_strength() -> float:
    return _STRENGTH.get()


@contextlib.contextmanager
def strength(value: float) -> Iterator[None]:
    """Apply adapter terms at `value` (0 = none, 1 = as trained) inside the block."""
    token = _STRENGTH.set(float(value))
    try:
        yield
    finally:
        _STRENGTH.reset(token)
