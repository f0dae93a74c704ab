"""A set of files and how to read them: what a credential and its ``fallback`` both are.

The checks that tie one key to another (``expiry_file`` and ``key_file`` must name a role,
a pattern role cannot be a pair's half) live here, with the helpers the credential's own
cross-field checks use too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from broker.config.errors import Located, did_you_mean, errors_at, show
from broker.config.fields import ExpandedPath, ExpiryField, Model, RoleName, SelectorField
from broker.config.preset_merge import default_expiry_file
from broker.config.presets import PROBLEM_CODES
from broker.core.expiry import ExpirySource
from broker.core.globs import GLOB_CHARS, is_glob

__all__ = ["FallbackSettings", "FileSet", "must_be_one_file", "must_be_role", "roles_of"]


def roles_of(info: ValidationInfo) -> list[str] | None:
    """The credential's roles, or None when ``files`` itself failed (already reported)."""
    files = info.data.get("files")
    return list(files) if isinstance(files, dict) else None


def must_be_role(value: str, info: ValidationInfo) -> None:
    """``value`` must name one of the roles in ``files``."""
    roles = roles_of(info)
    if roles is not None and value not in roles:
        raise ValueError(
            f"{show(value)} is not a role of this credential; roles: {', '.join(roles)}"
        )


def must_be_one_file(role: str, info: ValidationInfo, why: str) -> None:
    """``role`` must be one file, not a pattern; ``why`` says what needs it to be."""
    files = info.data.get("files")
    if isinstance(files, dict) and role in files and is_glob(files[role]):
        raise ValueError(
            f"role {show(role)} is a pattern (a set of files), but {why}; name one file"
        )


class FileSet(Model):
    """What a set of files holds and how to read it: shared by a credential and its fallback."""

    files: dict[RoleName, ExpandedPath]
    format: Literal["text", "jwt", "json", "pem", "ini"] = "text"
    # `expiry` in TOML: one source, or several tried in order. `.expiry` is the first.
    expiry_sources: ExpiryField = Field(default=(ExpirySource("none"),), alias="expiry")
    expiry_file: str = ""  # filled with the first role before validation when not written
    select: SelectorField | None = None
    key_file: str | None = None
    # The roles whose files must not be open to group or others (None: every role); the
    # tls preset names only the key, as a certificate is public.
    private_roles: tuple[str, ...] | None = None
    remedies: Mapping[str, str] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _fill_expiry_file(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            data = dict(data)
            default_expiry_file(data)
        return data

    @property
    def expiry(self) -> ExpirySource:
        """The first (often the only) expiry source."""
        return self.expiry_sources[0]

    @field_validator("files")
    @classmethod
    def _check_files(cls, value: dict[str, Path]) -> dict[str, Path]:
        if not value:
            raise ValueError('at least one file is needed: files = { token = "/path/to/file" }')
        problems: list[Located] = []
        first_role: dict[Path, str] = {}
        for role, path in value.items():
            # The directory part as one string: a separator is no pattern character, so a
            # pattern character in it is one in some component (without making each part).
            if not GLOB_CHARS.isdisjoint(os.path.dirname(path)):
                problems.append(
                    (
                        (role,),
                        "only the file name may be a pattern (*, ? or [); "
                        "the directory part must be a plain path",
                    )
                )
            elif path in first_role:
                problems.append(((role,), f"same file as role {show(first_role[path])}"))
            first_role.setdefault(path, role)
        if problems:
            raise errors_at(problems)
        return value

    @field_validator("expiry_file")
    @classmethod
    def _check_expiry_file(cls, value: str, info: ValidationInfo) -> str:
        must_be_role(value, info)
        return value

    @field_validator("key_file")
    @classmethod
    def _check_key_file(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        must_be_role(value, info)
        files = info.data.get("files")
        expiry_file = info.data.get("expiry_file")
        if value == expiry_file:
            raise ValueError(
                "must name the role of the private key, not the expiry_file (the certificate)"
            )
        if info.data.get("format", "pem") != "pem":
            raise ValueError('checks a key against a certificate: needs format = "pem"')
        if isinstance(files, dict) and any(
            is_glob(files[role]) for role in (value, expiry_file) if role in files
        ):
            raise ValueError("the key and the certificate must each be one file, not a pattern")
        return value

    @field_validator("private_roles")
    @classmethod
    def _check_private_roles(
        cls, value: tuple[str, ...] | None, info: ValidationInfo
    ) -> tuple[str, ...] | None:
        for role in value or ():
            must_be_role(role, info)
        return value

    @field_validator("remedies")
    @classmethod
    def _check_remedies(cls, value: Mapping[str, str], info: ValidationInfo) -> Mapping[str, str]:
        roles = roles_of(info)
        problems: list[Located] = []
        for key, text in value.items():
            code, colon, role = key.partition(":")
            if code not in PROBLEM_CODES:
                problems.append(
                    (
                        (key,),
                        f"unknown problem code {show(code)}{did_you_mean(code, PROBLEM_CODES)}",
                    )
                )
            elif colon and roles is not None and role not in roles:
                problems.append(
                    (
                        (key,),
                        f"{show(role)} is not a role of this credential; "
                        f"roles: {', '.join(roles)}",
                    )
                )
            elif not text.strip():
                problems.append(((key,), "the remedy text is empty"))
        if problems:
            raise errors_at(problems)
        return dict(value)


class FallbackSettings(FileSet):
    """``fallback = {...}``: files to use instead while the expiry file is absent.

    Same keys as a credential's files, format, expiry, expiry_file, select, key_file and
    remedies; everything else (name, expiring window, max_size) is the credential's.
    """
