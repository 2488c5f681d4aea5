"""Strict reading of a user's config tables (TOML or JSON) into frozen dataclasses.

Every key of a table must be a field of its dataclass and every value must have that field's
type; anything else is a ValueError naming the key, its table, the value and what is accepted
(with the closest accepted key when one is near). Lists become tuples, and integers floats where
a number is expected; a field whose type is a dataclass is read from a nested table.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

FieldParser = Callable[[Any, str], Any]
"""Reads one field's raw value; called with (value, the table path of the field)."""


def table_label(path: str) -> str:
    """How an error names a table: "[moe]", "[expert_overrides.low_noise]", or the top level."""
    return f"[{path}]" if path else "the top level"


def key_label(path: str, key: str) -> str:
    """How an error names a key: "[moe] boundaries", or "batch_size" at the top level."""
    return f"[{path}] {key}" if path else key


def check_keys(table: Mapping[str, Any], accepted: Iterable[str], path: str) -> None:
    """ValueError naming every key of `table` not in `accepted`, each with the closest accepted
    key when one is near, and listing the accepted keys."""
    accepted = sorted(accepted)
    unknown = [k for k in table if k not in accepted]
    if not unknown:
        return
    close = {k: difflib.get_close_matches(str(k), accepted, n=1) for k in unknown}
    if len(unknown) == 1:
        hints = [f"did you mean {c[0]!r}?" for c in close.values() if c]
    else:
        hints = [f"{c[0]!r} for {k!r}?" for k, c in close.items() if c]
        hints = [f"did you mean {', '.join(hints)}"] if hints else []
    s = "s" if len(unknown) > 1 else ""
    hint = f" ({hints[0]})" if hints else ""
    raise ValueError(
        f"unknown key{s} {', '.join(map(repr, unknown))} in {table_label(path)}{hint}; "
        f"accepted keys there: {', '.join(accepted)}"
    )


def parse_table(
    cls: type,
    table: Any,
    path: str = "",
    *,
    parsers: Mapping[str, FieldParser] | None = None,
) -> Any:
    """An instance of the dataclass `cls` from `table`, strictly (see the module docstring).

    Args:
        cls: a dataclass; its type hints say what each key takes.
        table: the table's dict (an instance of `cls` is returned as it is).
        path: the table's dotted path in the file ("" for the top level), for errors.
        parsers: field name -> reader, for fields whose value is not a plain typed value.
    Returns:
        `cls(**fields)`; a ValueError from its validation is prefixed with the table.
    """
    if isinstance(table, cls):
        return table
    kwargs = parse_fields(cls, table, path, parsers=parsers)
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ValueError(f"{table_label(path)}: {e}" if path else str(e)) from None


def parse_fields(
    cls: type, table: Any, path: str, *, parsers: Mapping[str, FieldParser] | None = None
) -> dict[str, Any]:
    """The checked and converted fields of `table` for `cls` (see `parse_table`), not built."""
    if not isinstance(table, Mapping):
        raise ValueError(
            f"{table_label(path)} must be a table of {cls.__name__} fields; got {table!r}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    check_keys(table, fields, path)
    hints = typing.get_type_hints(cls)
    missing = [
        n
        for n, f in fields.items()
        if n not in table
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        named = [f"[{path}.{n}]" if path else f"[{n}]" for n in missing]
        named = [
            f"{t} table" if _is_dataclass(hints[n]) else repr(n) for t, n in zip(named, missing)
        ]
        raise ValueError(f"{table_label(path)} lacks the required {', '.join(named)}")
    out = {}
    for key, value in table.items():
        sub = f"{path}.{key}" if path else key
        if parsers and key in parsers:
            out[key] = parsers[key](value, sub)
        elif _is_dataclass(hints[key]):
            out[key] = parse_table(hints[key], value, sub)
        else:
            out[key] = convert(value, hints[key], key_label(path, key))
    return out


def parse_named_tables(cls: type, value: Any, path: str) -> dict[str, dict[str, Any]]:
    """A table of tables keyed by name, each holding some of `cls`'s fields, checked and
    converted as `parse_fields` does (`[expert_overrides.low_noise]` with `ffn_dim = 512`)."""
    if isinstance(value, tuple):  # already normalised by the dataclass that holds it
        return dict(value)
    if not isinstance(value, Mapping):
        raise ValueError(
            f"{path} must be a table of tables ([{path}.NAME]) of {cls.__name__} fields; "
            f"got {value!r}"
        )
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    out = {}
    for name, changes in value.items():
        sub = f"{path}.{name}"
        if not isinstance(changes, Mapping):
            raise ValueError(f"[{sub}] must be a table of {cls.__name__} fields; got {changes!r}")
        check_keys(changes, names, sub)
        out[name] = {k: convert(v, hints[k], key_label(sub, k)) for k, v in changes.items()}
    return out


def convert(value: Any, hint: Any, what: str) -> Any:
    """`value` checked against the type `hint` (lists as tuples, integers as floats where a
    number is expected); a ValueError names `what`, the value and the expected type."""
    try:
        return _convert(value, hint)
    except _WrongType as e:
        bad = e.args[0]
        got = _kind(value) if bad is value else f"{_kind(value)} holding {bad!r}, {_kind(bad)}"
        raise ValueError(
            f"{what} = {value!r} has the wrong type: expected {describe(hint)}, got {got}"
        ) from None


class _WrongType(Exception):
    """args[0]: the (innermost) value that does not fit."""


def _convert(value: Any, hint: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg)
            except _WrongType:
                pass
        raise _WrongType(value)
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, str):
        return value
    if origin is tuple and isinstance(value, (list, tuple)):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0]) for v in value)
        if len(value) == len(args):
            return tuple(_convert(v, a) for v, a in zip(value, args))
    if origin is dict and isinstance(value, Mapping):
        return {_convert(k, args[0]): _convert(v, args[1]) for k, v in value.items()}
    raise _WrongType(value)


def describe(hint: Any) -> str:
    """The type `hint` in a user's words: "an integer", "a list of 3 integers"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    plural = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else describe(a) for a in args)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"a list of {plural.get(args[0], describe(args[0]))}"
    if origin is tuple:
        kinds = {plural.get(a, describe(a)) for a in args}
        return f"a list of {len(args)} {kinds.pop()}" if len(kinds) == 1 else f"a list {args}"
    if origin is dict:
        return f"a table of {plural.get(args[1], describe(args[1]))}"
    single = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return single.get(hint, getattr(hint, "__name__", str(hint)))


def _kind(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)}"
    kinds = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        dict: "a table",
        type(None): "null",
    }
    return kinds.get(type(value), type(value).__name__)


def _is_dataclass(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)
