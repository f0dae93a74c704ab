"""The whole configuration document: :class:`Config`, the tables of one TOML file together.

Build it with :func:`broker.config.load_config` or :func:`broker.config.parse_config`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Self

from pydantic import Field, ValidationInfo, field_validator, model_validator

from broker.config.context import context_of
from broker.config.credentials import CredentialSettings, SimpleTables
from broker.config.errors import errors_at, show
from broker.config.fields import Model
from broker.config.hooks import ActionSettings, WebhookSettings, check_unique_names
from broker.config.services import BrokerSettings, HttpSettings, MqttSettings

__all__ = ["Config"]


class Config(Model):
    """The whole configuration file. Build it with :func:`load_config` or :func:`parse_config`."""

    #: Fields that are no key of the file.
    hidden_keys: ClassVar[frozenset[str]] = frozenset({"source_path"})

    broker: BrokerSettings
    mqtt: MqttSettings | None = None
    http: HttpSettings | None = None
    credentials: tuple[CredentialSettings, ...] = Field(default=(), validate_default=True)
    actions: tuple[ActionSettings, ...] = ()
    webhooks: tuple[WebhookSettings, ...] = ()
    source_path: Path | None = None  # set by the loader; not a TOML key

    @model_validator(mode="before")
    @classmethod
    def _default_broker(cls, data: Any) -> Any:
        # An absent [broker] still needs its defaults computed (host name, state_dir from env).
        if isinstance(data, Mapping) and "broker" not in data:
            data = {**data, "broker": {}}
        return data

    @field_validator("broker")
    @classmethod
    def _pass_strictness_down(cls, value: BrokerSettings, info: ValidationInfo) -> BrokerSettings:
        # Fields validate in order: the credentials, validated next, take it as they are
        # made, rather than each being copied with it afterwards (10,000 copies of the
        # settings at once were most of the peak of loading a large config).
        context_of(info).strict_permissions = value.strict_permissions
        return value

    @field_validator("credentials", mode="before")
    @classmethod
    def _take_simple_tables(cls, value: Any, info: ValidationInfo) -> Any:
        # After [broker] (fields validate in order): the templates inherit its strictness.
        if type(value) is not list:
            return value
        simple = SimpleTables(context_of(info))
        taken: list[Any] = []
        for table in value:
            made = simple.take(table)
            if made is table:
                # The rest go through the full validation, in order: the names it sees
                # taken (a duplicate is reported on the later table) are those before it.
                return taken + value[len(taken) :]
            taken.append(made)
        return taken

    @field_validator("credentials")
    @classmethod
    def _check_credentials(
        cls, value: tuple[CredentialSettings, ...]
    ) -> tuple[CredentialSettings, ...]:
        if not value:
            raise ValueError("no credentials configured; add a [[credentials]] table")
        # Covers models passed in ready-made; parsed tables were already checked one by one.
        seen: set[str] = set()
        for index, credential in enumerate(value):
            if credential.name in seen:
                raise errors_at(
                    [
                        (
                            (index, "name"),
                            f"duplicate credential name "
                            f"{show(credential.name)}; names must be unique",
                        )
                    ]
                )
            seen.add(credential.name)
        return value

    @field_validator("actions")
    @classmethod
    def _check_actions(cls, value: tuple[ActionSettings, ...]) -> tuple[ActionSettings, ...]:
        check_unique_names(value, "action")
        return value

    @field_validator("webhooks")
    @classmethod
    def _check_webhooks(cls, value: tuple[WebhookSettings, ...]) -> tuple[WebhookSettings, ...]:
        check_unique_names(value, "webhook")
        return value

    @model_validator(mode="after")
    def _inherit_strictness(self) -> Self:
        # What is still undecided: credentials passed in ready-made (tables got it already).
        strict = self.broker.strict_permissions
        if any(c.strict_permissions is None for c in self.credentials):
            inherited = tuple(
                c
                if c.strict_permissions is not None
                else c.model_copy(update={"strict_permissions": strict})
                for c in self.credentials
            )
            object.__setattr__(self, "credentials", inherited)
        return self

    def credential(self, name: str) -> CredentialSettings:
        """The credential called ``name``; ``KeyError`` if there is none."""
        for credential in self.credentials:
            if credential.name == name:
                return credential
        raise KeyError(name)
