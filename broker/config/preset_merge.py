"""Laying a preset under a ``[[credentials]]`` table, before the table is validated.

The preset's values come first and every key the user writes overrides them; ``files`` and
``remedies`` merge per key (the user can re-point or add roles, but not remove one). A
preset's parameters (``profile = "dev"``) are taken out of the table and their values put
into the preset's templates. What comes out is a plain table: validating it is the models'
job, so a preset can say nothing a user could not have written.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from broker.config.presets import Preset, PresetFallback
from broker.config.scalars import parameter

__all__ = ["PresetPathRequired", "UserWroteParameters", "apply_preset", "default_expiry_file"]

# Keys whose tables merge per entry over the preset's instead of replacing it.
_MERGED_KEYS = ("files", "remedies")


@dataclass(frozen=True, slots=True)
class PresetPathRequired:
    """Stands in for a preset role whose path the user must supply (an empty template)."""

    preset: str
    role: str


@dataclass(frozen=True, slots=True)
class UserWroteParameters:
    """Stands in for a ``parameters`` table written in the config: not a key users may set."""


def apply_preset(data: Mapping[str, Any], presets: Mapping[str, Preset]) -> dict[str, Any]:
    """The credential table ``data`` with its preset (if any, and known) laid under it."""
    table = dict(data)
    wrote_parameters = "parameters" in table
    preset = presets.get(table["preset"]) if isinstance(table.get("preset"), str) else None
    if preset is not None:
        merged = _preset_values(preset)
        for key, value in table.items():
            if key in _MERGED_KEYS and isinstance(value, Mapping):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
        table = merged
        _fill_parameters(table, preset)
    if wrote_parameters:
        table["parameters"] = UserWroteParameters()
    default_expiry_file(table)
    return table


def default_expiry_file(data: dict[str, Any]) -> None:
    """``expiry_file`` defaults to the first role written."""
    files = data.get("files")
    if "expiry_file" not in data and isinstance(files, Mapping) and files:
        first = next(iter(files))
        if isinstance(first, str):
            data["expiry_file"] = first


def _preset_values(preset: Preset) -> dict[str, Any]:
    """A preset as config keys, ready for the user's keys to be laid over it."""
    values: dict[str, Any] = {
        "name": preset.name,
        "files": {
            role: template or PresetPathRequired(preset.name, role)
            for role, template in preset.files.items()
        },
        "format": preset.format,
        "expiry": _expiry_value(preset.expiry),
        "remedies": dict(preset.remedies),
    }
    optional: dict[str, Any] = {
        "expiry_file": preset.expiry_file,
        "select": preset.select,
        "key_file": preset.key_file,
        "private_roles": list(preset.private_roles) if preset.private_roles is not None else None,
        "expiring_before": preset.expiring_before,
        "expiring_fraction": preset.expiring_fraction,
        "refresh": dict(preset.refresh) if preset.refresh is not None else None,
        "fallback": _fallback_values(preset.fallback) if preset.fallback is not None else None,
    }
    values.update({key: value for key, value in optional.items() if value is not None})
    return values


def _fallback_values(fallback: PresetFallback) -> dict[str, Any]:
    values: dict[str, Any] = {
        "files": dict(fallback.files),
        "format": fallback.format,
        "expiry": _expiry_value(fallback.expiry),
    }
    if fallback.expiry_file is not None:
        values["expiry_file"] = fallback.expiry_file
    if fallback.remedies:
        values["remedies"] = dict(fallback.remedies)
    return values


def _expiry_value(expiry: str | tuple[str, ...]) -> str | list[str]:
    return expiry if isinstance(expiry, str) else list(expiry)


def _substitute(value: Any, parameters: Mapping[str, str], *, quote: bool = False) -> Any:
    """``{name}`` -> the parameter's value in a string, or in each string of a list."""
    if isinstance(value, str):
        for name, replacement in parameters.items():
            value = value.replace(f"{{{name}}}", shlex.quote(replacement) if quote else replacement)
        return value
    if isinstance(value, list | tuple):
        return [_substitute(item, parameters, quote=quote) for item in value]
    return value


def _fill_parameters(data: dict[str, Any], preset: Preset) -> None:
    """Take the preset's parameters out of ``data`` and put their values into its templates:
    the expiry sources, the selector, the remedies (shell-quoted), the refresh command's
    arguments and the fallback's expiry and selector. Paths are left alone.
    """
    parameters: dict[str, Any] = {
        name: data.pop(name, default) for name, default in preset.parameters.items()
    }
    if not parameters:
        return
    data["parameters"] = parameters
    usable: dict[str, str] = {}
    for name, value in parameters.items():
        try:
            usable[name] = parameter(value)
        except ValueError:
            return  # reported at the parameter's key; leave the templates alone
    for key in ("expiry", "select"):
        if key in data:
            data[key] = _substitute(data[key], usable)
    if isinstance(data.get("remedies"), Mapping):
        data["remedies"] = {
            code: _substitute(text, usable, quote=True) for code, text in data["remedies"].items()
        }
    refresh = data.get("refresh")
    if isinstance(refresh, Mapping) and isinstance(refresh.get("command"), list | tuple):
        data["refresh"] = {**refresh, "command": _substitute(refresh["command"], usable)}
    fallback = data.get("fallback")
    if isinstance(fallback, Mapping):
        data["fallback"] = {
            key: _substitute(value, usable) if key in ("expiry", "select") else value
            for key, value in fallback.items()
        }
