"""The one typed config layer: YAML/JSON documents checked against stdlib dataclasses by pydantic.

Recipes and adapter configs are dataclasses marked `@document_type`; `parse` turns a plain mapping into
one, and a wrong value into a ValueError that names its key path the way a user wrote it:
`train.lr: expected float, got 'abc'`. Pydantic's lax mode reads lists as tuples and mappings as
dataclasses; the scalar types below are stricter, so that YAML's `true` is never a number.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Annotated, Any, TypeVar

import pydantic
from pydantic_core import ErrorDetails

T = TypeVar("T")


def _number_from_string(value: Any) -> Any:
    """PyYAML reads `2e-2` (no dot) as a string; a string that is no number is left to fail as itself."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


#: An int: not a bool, not 2.0, not "2".
Int = Annotated[int, pydantic.Strict()]
#: A float: a number or a numeric string, never a bool.
Float = Annotated[float, pydantic.Strict(), pydantic.BeforeValidator(_number_from_string)]
#: true or false: not 1, not "yes".
Bool = Annotated[bool, pydantic.Strict()]

_DOCUMENT = pydantic.ConfigDict(extra="forbid", use_attribute_docstrings=True)


def document_type(cls: type[T]) -> type[T]:
    """Mark a dataclass as a config document: unknown keys are errors, field docstrings describe its schema.
    Nested dataclasses and subclasses inherit the mark."""
    return pydantic.with_config(_DOCUMENT)(cls)


@functools.cache
def _adapter(cls: type) -> pydantic.TypeAdapter:
    return pydantic.TypeAdapter(cls)


def parse(cls: type[T], document: Any, prefix: str = "", key_name: str = "key") -> T:
    """`document` as a `cls`. A ValueError lists what is wrong, each at its key path under `prefix`
    (`key_name` is what unknown and missing keys are called); the config's own checks speak for themselves."""
    try:
        return _adapter(cls).validate_python(document)
    except pydantic.ValidationError as error:
        messages = (_message(cls, detail, prefix, key_name) for detail in error.errors())
        raise ValueError("; ".join(dict.fromkeys(messages))) from error


def json_schema(cls: type) -> dict[str, Any]:
    """The JSON schema of a document type (for editors), with the field docstrings as descriptions."""
    return _adapter(cls).json_schema()


def describe(value: Any) -> str:
    """A value for an error message: strings as written, anything else with its type."""
    return repr(value) if isinstance(value, str) else f"{value!r} ({type(value).__name__})"


_EXPECTED = {
    "int_type": "int",
    "float_type": "float",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "tuple_type": "a list",
    "dict_type": "a mapping",
    "dataclass_type": "a mapping",
}


def _message(cls: type, detail: ErrorDetails, prefix: str, key_name: str) -> str:
    """One pydantic error in the project's words: `key.path: expected …, got …`."""
    if detail["type"] == "value_error":  # raised by the config class itself, naming its field
        return str(detail["ctx"]["error"])
    loc, problem = _problem(cls, detail, key_name)
    where = ".".join(str(part) for part in (prefix, *loc) if part != "")
    return f"{where}: {problem}" if where else problem


def _problem(cls: type, detail: ErrorDetails, key_name: str) -> tuple[tuple[int | str, ...], str]:
    """Where an error is and what was expected there; the type at that key path says which keys,
    choices or list length."""
    loc, kind, got = detail["loc"], detail["type"], f", got {describe(detail['input'])}"
    short = kind == "missing" and bool(loc) and isinstance(loc[-1], int)  # an item of a fixed-length list
    if short:
        loc = loc[:-1]  # the error is about the whole list, as when it is too long
    if short or kind == "too_long":
        return loc, f"expected a list of {len(typing.get_args(_annotation_at(cls, loc)))} values{got}"
    if kind == "missing":
        return loc, f"required {key_name} is missing"
    if kind == "unexpected_keyword_argument":
        known = ", ".join(field.name for field in dataclasses.fields(_annotation_at(cls, loc[:-1])))
        return loc, f"unknown {key_name} {loc[-1]!r} (known: {known})"
    if kind == "literal_error":
        return loc, f"expected one of {', '.join(map(str, typing.get_args(_annotation_at(cls, loc))))}{got}"
    return loc, (f"expected {_EXPECTED[kind]}" if kind in _EXPECTED else detail["msg"]) + got


def _annotation_at(cls: type, loc: tuple[int | str, ...]) -> Any:
    """The type at a key path of `cls`: the dataclass whose keys, the Literal whose choices, or the
    tuple whose length an error is about."""
    annotation: Any = cls
    for part in loc:
        annotation = _without_none(annotation)
        if dataclasses.is_dataclass(annotation):
            annotation = typing.get_type_hints(annotation)[part]
        else:  # a list item
            annotation = typing.get_args(annotation)[0]
    return _without_none(annotation)


def _without_none(annotation: Any) -> Any:
    """`X | None` -> X (an optional value's errors are about X)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    return annotation
