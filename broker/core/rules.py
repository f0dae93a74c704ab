"""What the state machine needs to know of a credential's settings, as a protocol.

The config's ``CredentialSettings`` (pydantic) has all of it, so it is passed as is; the
core never imports the config, and a test or another front end may pass any object with
these attributes.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from pathlib import PurePath
from typing import Protocol

from broker.core.expiry import ExpirySource
from broker.core.formats import Selector

__all__ = ["CredentialRules"]


class CredentialRules(Protocol):
    """How to judge one credential's files: format, expiry, checks and remedies."""

    @property
    def name(self) -> str: ...

    @property
    def files(self) -> Mapping[str, PurePath]:
        """Role -> path (a pattern in its last component for a set of files)."""

    @property
    def format(self) -> str:
        """``text``, ``jwt``, ``json``, ``pem`` or ``ini``: what the expiry file must parse as."""

    @property
    def expiry_sources(self) -> Sequence[ExpirySource]:
        """Where the lifetime comes from, tried in order."""

    @property
    def expiry_file(self) -> str:
        """The role whose file carries the format and the expiry."""

    @property
    def select(self) -> Selector | None:
        """The part of the expiry file that counts (``None``: all of it)."""

    @property
    def key_file(self) -> str | None:
        """The role that must hold the private key of the expiry file's certificate."""

    @property
    def private_roles(self) -> Collection[str] | None:
        """The roles whose files must not be open to group or others (``None``: every role)."""

    @property
    def strict_permissions(self) -> bool | None:
        """Whether insecure permissions make the credential invalid, not merely a warning."""

    @property
    def expiring_before(self) -> float:
        """Seconds before expiry at which the credential becomes ``expiring``."""

    @property
    def expiring_fraction(self) -> float:
        """The share of a known lifetime after which the credential becomes ``expiring``."""

    def remedy(self, code: str, role: str) -> str | None:
        """The remedy text for problem ``code`` on the file of ``role``, or ``None``."""
