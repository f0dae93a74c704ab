"""A credential's upkeep: ``refresh = {...}`` (renew it by a command) and ``validate = {...}``
(ask the real API whether it still accepts it)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator

from broker.config.fields import Model, PositiveDuration, StatusCode
from broker.config.scalars import argv_not_a_string, check_api_url, check_argv

__all__ = ["PLACEHOLDER_RE", "RefreshSettings", "ValidateSettings"]

_HEADER_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: A ``{role}`` placeholder in a validate header.
PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")


class RefreshSettings(Model):
    """``refresh = {...}``: a command that renews the credential (argv, no shell)."""

    command: tuple[str, ...] = Field(min_length=1)
    output: str | None = None
    timeout: PositiveDuration = 60.0
    on: Literal["expiring", "expired"] = "expiring"

    @field_validator("command", mode="before")
    @classmethod
    def _not_a_string(cls, value: Any) -> Any:
        return argv_not_a_string(value)

    @field_validator("command")
    @classmethod
    def _check_command(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return check_argv(value)


class ValidateSettings(Model):
    """``validate = {...}``: ask the real API whether it still accepts the credential."""

    url: str
    header: str | None = None
    expect: tuple[StatusCode, ...] = Field(default=(200,), min_length=1)
    interval: PositiveDuration = 600.0
    timeout: PositiveDuration = 10.0

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        return check_api_url(value)

    @field_validator("header")
    @classmethod
    def _check_header(cls, value: str | None) -> str | None:
        # Never echo the header: it is where a literal token would be written.
        if value is None:
            return None
        if any(c in value for c in "\r\n\0"):
            raise ValueError("must be a single line (no CR, LF or NUL)")
        name, sep, rest = value.partition(":")
        if not sep or not _HEADER_NAME_RE.fullmatch(name) or not rest.strip():
            raise ValueError('expected "Name: value", e.g. "Authorization: Bearer {token}"')
        return value

    @property
    def placeholders(self) -> tuple[str, ...]:
        """Roles named by ``{role}`` placeholders in ``header``, in order, without repeats."""
        if self.header is None:
            return ()
        return tuple(dict.fromkeys(PLACEHOLDER_RE.findall(self.header)))
