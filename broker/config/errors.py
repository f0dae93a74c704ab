"""The config error messages: :class:`ConfigError`, and pydantic's errors in the user's words.

Every problem is one ``(key path, message)`` line, the path written the way the TOML reads
(``credentials[2].expiry``). Validators raise ``ValueError`` with a finished message, or
:func:`errors_at` for problems below their own key; :func:`convert` turns what pydantic
collected into those lines, and words the errors pydantic itself found (types, unknown keys,
missing keys). No message here ever holds a value that may be secret.
"""

from __future__ import annotations

import difflib
import json
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from broker.config.presets import Preset
from broker.core.errors import BrokerError

__all__ = [
    "ConfigError",
    "Located",
    "convert",
    "did_you_mean",
    "errors_at",
    "one_of",
    "show",
    "unknown_key",
    "unknown_key_error",
]

#: A problem's place below the validator that found it, and its message.
Located = tuple[tuple[str | int, ...], str]


class ConfigError(BrokerError):
    """The configuration cannot be used. ``errors`` lists every problem found.

    Each entry is ``(key path, message)``, e.g. ``("credentials[2].expiry", 'unknown source
    "jwtt"; ...')``; the path is ``""`` for problems with the file as a whole. ``str()`` gives
    one line per error, each prefixed with the config file's path when there is one.
    """

    def __init__(self, errors: Sequence[tuple[str, str]], source_path: Path | None = None) -> None:
        # Both arguments go to Exception so the error pickles and copies faithfully.
        super().__init__(list(errors), source_path)
        self.errors: list[tuple[str, str]] = list(errors)
        self.source_path = source_path

    def __str__(self) -> str:
        prefix = f"{self.source_path}: " if self.source_path is not None else ""
        lines = [f"{prefix}{path}: {msg}" if path else prefix + msg for path, msg in self.errors]
        return "\n".join(lines) or f"{prefix}invalid configuration"


def errors_at(items: Iterable[Located]) -> ValidationError:
    """A ValidationError with errors below the current location.

    Raised from a validator, pydantic prefixes each ``loc`` with the validator's own location,
    which is how a cross-field check reports ``refresh.output`` rather than ``refresh``.
    """
    details: list[InitErrorDetails] = [
        {
            "type": PydanticCustomError("config", "{message}", {"message": message}),
            "loc": loc,
            "input": None,
        }
        for loc, message in items
    ]
    return ValidationError.from_exception_data("config", details)


def unknown_key_error() -> PydanticCustomError:
    """Raised by a validator for a key that is a field but not one a user may write.

    :func:`convert` words it as pydantic's own "extra key" error, with the same hints.
    """
    return PydanticCustomError("extra_forbidden", "unknown key")


def show(value: str, limit: int = 64) -> str:
    """A user-written (never secret) value quoted for a message, cut short if huge."""
    if len(value) > limit:
        value = value[:limit] + "..."
    return json.dumps(value, ensure_ascii=False)


def one_of(choices: Iterable[str]) -> str:
    """The choices, sorted, for "expected one of ..."."""
    return ", ".join(sorted(choices))


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean "x"?)`` for the closest choice, or ``""`` when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {show(close[0])}?)" if close else ""


# --------------------------------------------------------------------------------------------
# Which table a key path is in

# Keys people reach for that must not exist, with what to do instead.
_FORBIDDEN_KEYS: dict[tuple[str, str], str] = {
    ("mqtt", "password"): "inline passwords are not accepted: write the password to a file only "
    'the broker can read (chmod 600) and set password_file = "/path/to/file"',
    ("http", "token"): "inline tokens are not accepted: write the token to a file only the "
    'broker can read (chmod 600) and set token_file = "/path/to/file"',
}


class _ArrayOf:
    """Stands for an array of tables while walking a key path."""

    def __init__(self, model: type[BaseModel]) -> None:
        self.model = model


def _table_of(annotation: Any) -> type[BaseModel] | _ArrayOf | None:
    """The table a field holds: a model, an array of models, or neither."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        found = [t for t in map(_table_of, typing.get_args(annotation)) if t is not None]
        return found[0] if len(found) == 1 else None
    if origin is tuple:
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            item = _table_of(args[0])
            return _ArrayOf(item) if isinstance(item, type) else None
        return None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _field_table(model: type[BaseModel], key: str) -> type[BaseModel] | _ArrayOf | None:
    for name, info in model.model_fields.items():
        if (info.alias or name) == key:
            return _table_of(info.annotation)
    return None


def _model_at(root: type[BaseModel], loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The model whose table is at ``loc`` below ``root`` (to list the keys it knows)."""
    current: type[BaseModel] | _ArrayOf | None = root
    for part in loc:
        if isinstance(part, int):
            current = current.model if isinstance(current, _ArrayOf) else None
        elif isinstance(current, type):
            current = _field_table(current, part)
        else:
            return None
    return current if isinstance(current, type) else None


def _hidden_keys(model: type[BaseModel]) -> frozenset[str]:
    # Fields that are no TOML key: set by the loader, or filled in from a preset's keys.
    hidden: object = getattr(model, "hidden_keys", None)
    return frozenset(hidden) if isinstance(hidden, frozenset) else frozenset()


def _known_keys(model: type[BaseModel]) -> list[str]:
    keys = [info.alias or name for name, info in model.model_fields.items()]
    return [k for k in keys if k not in _hidden_keys(model)]


def _section_of(root: type[BaseModel], key: str) -> str | None:
    """The single table (``[broker]``, ...) of ``root`` that has ``key``, if any does."""
    for section in root.model_fields:
        table = _field_table(root, section)
        if isinstance(table, type) and key in table.model_fields:
            return section
    return None


def unknown_key(
    loc: tuple[str | int, ...], root: type[BaseModel], presets: Mapping[str, Preset]
) -> str:
    """The message for an unknown key at ``loc``, with a hint at what was meant."""
    key = loc[-1]
    parent = loc[:-1]
    if not isinstance(key, str):
        return "keys must be strings"
    forbidden = _FORBIDDEN_KEYS.get((str(parent[0]), key)) if len(parent) == 1 else None
    if forbidden is not None:
        return forbidden
    message = f"unknown key {show(key)}"
    model = _model_at(root, parent)
    takers = sorted(name for name, preset in presets.items() if key in preset.parameters)
    if model is not None and "preset" in model.model_fields and takers:
        return f"{message}: {show(key)} is a parameter of preset {', '.join(takers)} only"
    if model is not None:
        hint = did_you_mean(key, _known_keys(model))
        section = _section_of(root, key) if model is root else None
        if not hint and section is not None:
            # A key written after the wrong [table] header, or before any header.
            hint = f" (it belongs in the [{section}] table)"
        message += hint
    return message


# --------------------------------------------------------------------------------------------
# pydantic errors -> (key path, message)

_TYPE_MESSAGES = {
    "string_type": "expected a string",
    "int_type": "expected a whole number",
    "int_parsing": "expected a whole number",
    "int_from_float": "expected a whole number",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "dict_type": "expected a table",
    "model_type": "expected a table",
    "model_attributes_type": "expected a table",
    "mapping_type": "expected a table",
    "tuple_type": "expected an array",
    "list_type": "expected an array",
    "iterable_type": "expected an array",
    "invalid_key": "keys must be strings",
    "missing": "is required",
}


def _message(
    error: Mapping[str, Any],
    loc: tuple[str | int, ...],
    root: type[BaseModel],
    presets: Mapping[str, Preset],
) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "value_error" and "error" in ctx:
        return str(ctx["error"])  # our validators' messages, shown verbatim
    if kind == "config":
        return str(error["msg"])
    if kind == "extra_forbidden":
        return unknown_key(loc, root, presets)
    if kind == "literal_error":
        return "must be " + str(ctx.get("expected", "")).replace("'", '"')
    if kind == "too_short":
        return "must not be empty"
    if loc == ("credentials",) and kind in ("tuple_type", "list_type"):
        return "expected [[credentials]] tables (an array of tables)"
    if kind == "missing" and loc == ("mqtt", "url"):
        return 'is required, e.g. url = "mqtt://127.0.0.1:1883"'
    return _TYPE_MESSAGES.get(kind, str(error["msg"]))


def _format_loc(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        text = part if re.fullmatch(r"[A-Za-z0-9_-]+", part) else json.dumps(part)
        out += f".{text}" if out else text
    return out


def convert(
    exc: ValidationError, root: type[BaseModel], presets: Mapping[str, Preset]
) -> list[tuple[str, str]]:
    """Every error of ``exc`` (from validating ``root``) as ``(key path, message)``, once."""
    errors: list[tuple[str, str]] = []
    raw = exc.errors(include_url=False, include_input=False, include_context=True)
    # A credential whose preset is unknown got no files from it; "files is required" there
    # would only be noise next to the preset error.
    bad_presets = {e["loc"][:2] for e in raw if e["loc"][0::2] == ("credentials", "preset")}
    for error in raw:
        loc = tuple(error["loc"])
        if error["type"] == "missing" and loc[2:] == ("files",) and loc[:2] in bad_presets:
            continue
        if loc and loc[-1] == "[key]":  # pydantic's marker for "the key itself is wrong"
            loc = loc[:-1]
        if len(loc) == 4 and loc[0] == "credentials" and loc[2] == "parameters":
            loc = (*loc[:2], loc[3])  # a preset's parameter is written as a credential key
        entry = (_format_loc(loc), _message(error, loc, root, presets))
        if entry not in errors:
            errors.append(entry)
    return errors
