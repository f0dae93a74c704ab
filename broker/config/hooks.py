"""What the broker does on an event: ``[[actions]]`` (signal a process or run a command) and
``[[webhooks]]`` (POST the event), both routed by credential and event name globs."""

from __future__ import annotations

import signal
from collections.abc import Sequence
from typing import Any, ClassVar, Literal, Self

from pydantic import Field, ValidationInfo, field_validator, model_validator

from broker.config.errors import errors_at, show
from broker.config.fields import Duration, ExpandedPath, Model, PositiveDuration
from broker.config.scalars import argv_not_a_string, check_api_url, check_argv, check_ident
from broker.core.events import REFRESHED

__all__ = ["ActionSettings", "SignalSettings", "WebhookSettings", "check_unique_names"]

_SIGNAL_NAMES = frozenset(s.name.removeprefix("SIG") for s in signal.Signals)


def _globs(value: Any) -> Any:
    if isinstance(value, str):
        raise ValueError('expected an array of names or globs, e.g. ["web-tls", "api-*"]')
    return value


def _check_globs(value: tuple[str, ...], what: str) -> tuple[str, ...]:
    for item in value:
        if not item or any(c.isspace() or c == "\0" for c in item):
            raise ValueError(f"{what} must be non-empty names or globs without whitespace")
    return value


class SignalSettings(Model):
    """``signal = {pidfile, name}``: send a signal to the process whose pid is in a file."""

    pidfile: ExpandedPath
    name: str = "HUP"

    @field_validator("name")
    @classmethod
    def _check_signal(cls, value: str) -> str:
        bare = value.upper().removeprefix("SIG")
        if bare not in _SIGNAL_NAMES:
            raise ValueError(f"unknown signal {show(value)}; e.g. HUP, USR1, USR2, TERM")
        return bare


class _RoutedSettings(Model):
    """What actions and webhooks share: a name, and which credentials and events they take."""

    _kind: ClassVar[str]
    name: str
    credentials: tuple[str, ...] = ("*",)
    on: tuple[str, ...] = ("credentials.*",)

    @field_validator("credentials", "on", mode="before")
    @classmethod
    def _not_a_string(cls, value: Any) -> Any:
        return _globs(value)

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return check_ident(value, f"{cls._kind} name")

    @field_validator("credentials", "on")
    @classmethod
    def _check_patterns(cls, value: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        return _check_globs(value, str(info.field_name))


class ActionSettings(_RoutedSettings):
    """``[[actions]]``: signal a process or run argv (no shell) when credentials change."""

    _kind: ClassVar[str] = "action"
    on: tuple[str, ...] = (REFRESHED,)
    signal: SignalSettings | None = None
    command: tuple[str, ...] | None = Field(default=None, min_length=1)
    coalesce: Duration = 0.5
    timeout: PositiveDuration = 30.0

    @field_validator("command", mode="before")
    @classmethod
    def _command_not_a_string(cls, value: Any) -> Any:
        return argv_not_a_string(value)

    @field_validator("command")
    @classmethod
    def _check_command(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return None if value is None else check_argv(value)

    @model_validator(mode="after")
    def _signal_xor_command(self) -> Self:
        if (self.signal is None) == (self.command is None):
            raise ValueError(
                'set either signal = {pidfile = "...", name = "HUP"} or command = [...]'
                + ("; not both" if self.signal is not None else "")
            )
        return self


class WebhookSettings(_RoutedSettings):
    """``[[webhooks]]``: POST each matching event (CloudEvents HTTP binding, Standard Webhooks)."""

    _kind: ClassVar[str] = "webhook"
    url: str
    secret_file: ExpandedPath | None = None
    mode: Literal["structured", "binary"] = "structured"
    timeout: PositiveDuration = 10.0

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        return check_api_url(value)


def check_unique_names(items: Sequence[ActionSettings | WebhookSettings], what: str) -> None:
    """Action (or webhook) names are unique; the duplicate is reported at its ``name``."""
    seen: set[str] = set()
    for index, item in enumerate(items):
        if item.name in seen:
            raise errors_at(
                [((index, "name"), f"duplicate {what} name {show(item.name)}; names are unique")]
            )
        seen.add(item.name)
