"""Small helpers shared by command-line parsers."""

from __future__ import annotations

from typing import Any

import yaml


def parse_assignments(items: list[str] | None) -> dict[str, Any]:
    """`["a=1", "b.c=true"]` -> `{"a": 1, "b.c": True}`; values are read as YAML scalars."""
    result: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected key=value, got {item!r}")
        result[key.strip()] = yaml.safe_load(value)
    return result
