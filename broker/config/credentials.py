"""One ``[[credentials]]`` table: :class:`CredentialSettings`, its preset already laid under it.

Named ``spec`` almost everywhere it is used (``spec.files``, ``spec.remedy(...)``): the
settings that specify one credential.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar, Self

from pydantic import (
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from broker.config.context import LoadContext, context_of, validation_context
from broker.config.errors import did_you_mean, errors_at, one_of, show, unknown_key_error
from broker.config.fields import (
    Duration,
    Fraction,
    ParameterValue,
    PositiveDuration,
    Size,
    StrictBoolField,
)
from broker.config.filesets import (
    FallbackSettings,
    FileSet,
    must_be_one_file,
    must_be_role,
    roles_of,
)
from broker.config.paths import home_display
from broker.config.preset_merge import UserWroteParameters, apply_preset
from broker.config.presets import default_remedy, fill_remedy
from broker.config.scalars import check_ident
from broker.config.upkeep import PLACEHOLDER_RE, RefreshSettings, ValidateSettings
from broker.core.globs import GLOB_CHARS

__all__ = ["DEFAULT_MAX_SIZE", "CredentialSettings", "SimpleTables"]

#: The largest credential file read unless ``max_size`` says otherwise.
DEFAULT_MAX_SIZE = 1024 * 1024


class CredentialSettings(FileSet):
    """One ``[[credentials]]`` table, with its preset (if any) already applied."""

    #: Fields that are no key of the table (``parameters`` are written as keys themselves).
    hidden_keys: ClassVar[frozenset[str]] = frozenset({"parameters"})

    name: str
    preset: str | None = None
    # A preset's parameters (`profile = "dev"`), written as keys of the credential's table.
    parameters: Mapping[str, ParameterValue] = Field(default_factory=dict)
    expiring_before: Duration = 900.0
    expiring_fraction: Fraction = 0.8
    max_size: Size = DEFAULT_MAX_SIZE
    # A consumer still on an older generation this long after a refresh is lagging.
    lag_after: PositiveDuration = 60.0
    # A consumer not heard from this long is forgotten.
    consumer_ttl: PositiveDuration = 600.0
    refresh: RefreshSettings | None = None
    validate_: ValidateSettings | None = Field(default=None, alias="validate")
    fallback: FallbackSettings | None = None
    # None: as [broker] strict_permissions says (filled in as the Config is validated).
    strict_permissions: StrictBoolField | None = None

    # HOME at load time, so remedies can show paths the way the preset and the user wrote them.
    _home: str | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, Mapping):
            return data  # pydantic reports "expected a table"
        return apply_preset(data, context_of(info).presets)

    @field_validator("parameters", mode="before")
    @classmethod
    def _no_parameters_table(cls, value: Any) -> Any:
        if isinstance(value, UserWroteParameters):
            raise unknown_key_error()
        return value

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str, info: ValidationInfo) -> str:
        check_ident(value, "name")
        # Uniqueness is checked here, through the shared load context, rather than after the
        # whole list validated: that way a duplicate is reported along with every other error.
        seen = context_of(info).seen_names
        if value in seen:
            raise ValueError(f"duplicate credential name {show(value)}; names must be unique")
        seen.add(value)
        return value

    @field_validator("preset")
    @classmethod
    def _check_preset(cls, value: str | None, info: ValidationInfo) -> str | None:
        presets = context_of(info).presets
        if value is not None and value not in presets:
            raise ValueError(
                f"unknown preset {show(value)}{did_you_mean(value, presets)}; "
                f"known presets: {one_of(presets)}"
            )
        return value

    @field_validator("refresh")
    @classmethod
    def _check_refresh(
        cls, value: RefreshSettings | None, info: ValidationInfo
    ) -> RefreshSettings | None:
        if value is not None and value.output is not None:
            try:
                must_be_role(value.output, info)
                must_be_one_file(value.output, info, "the command's output is written to it")
            except ValueError as exc:
                raise errors_at([(("output",), str(exc))]) from None
        return value

    @field_validator("validate_")
    @classmethod
    def _check_validate(
        cls, value: ValidateSettings | None, info: ValidationInfo
    ) -> ValidateSettings | None:
        if value is None or value.header is None:
            return value
        roles = roles_of(info)
        if roles is None:
            return value
        unknown = [p for p in PLACEHOLDER_RE.findall(value.header) if p not in roles]
        if unknown:
            raise errors_at(
                [
                    (
                        ("header",),
                        f"placeholder {{{unknown[0]}}} does not name a role of this credential; "
                        f"roles: {', '.join(roles)}",
                    )
                ]
            )
        try:
            for placeholder in value.placeholders:
                must_be_one_file(placeholder, info, "its content fills the header")
        except ValueError as exc:
            raise errors_at([(("header",), str(exc))]) from None
        return value

    @model_validator(mode="after")
    def _take_the_load_context(self, info: ValidationInfo) -> Self:
        context = context_of(info)
        self._home = context.home
        if self.strict_permissions is None and context.strict_permissions is not None:
            # This instance is the one being made (a ready-made one is not validated again):
            # nobody else holds it yet.
            object.__setattr__(self, "strict_permissions", context.strict_permissions)
        return self

    @property
    def watched_paths(self) -> tuple[Path, ...]:
        """Every path whose changes matter: the files, then the fallback's (patterns as such)."""
        return tuple(dict.fromkeys(self._watched()))

    @property
    def watched_path_texts(self) -> tuple[str, ...]:
        """:attr:`watched_paths` as text, de-duplicated as text (on POSIX two paths are equal
        exactly when their text is): what the engine keys on, without hashing a ``Path``
        per file (a tenth of building the engine's table at 10,000 credentials)."""
        return tuple(dict.fromkeys(str(p) for p in self._watched()))

    def _watched(self) -> Iterator[Path]:
        yield from self.files.values()
        if self.fallback is not None:
            yield from self.fallback.files.values()

    def with_fallback_files(self) -> CredentialSettings | None:
        """The settings to read the credential by while its expiry file is absent, or ``None``
        when it has no ``fallback``.

        The fallback's files, format, expiry, selector, key check and (added) remedies, with
        everything else of this credential. Not validated again: each part already was.
        """
        fallback = self.fallback
        if fallback is None:
            return None
        return self.model_copy(
            update={
                "files": dict(fallback.files),
                "format": fallback.format,
                "expiry_sources": fallback.expiry_sources,
                "expiry_file": fallback.expiry_file,
                "select": fallback.select,
                "key_file": fallback.key_file,
                "private_roles": fallback.private_roles,
                "remedies": {**self.remedies, **fallback.remedies},
                "fallback": None,
            }
        )

    def remedy(self, code: str, role: str) -> str | None:
        """The remedy text for problem ``code`` on file ``role``, or ``None`` if there is none.

        Looks up ``"<code>:<role>"``, then ``code`` in this credential's remedies (preset and
        config), then :func:`broker.config.presets.default_remedy`. ``{path}`` is the role's
        file (the expiry file's for an unknown role), ``{path:<role>}`` another role's, each
        shown with ``~`` for HOME and shell-quoted.
        """
        path = self.files.get(role) or self.files.get(self.expiry_file)
        shown = home_display(path, self._home) if path is not None else ""
        template = self.remedies.get(f"{code}:{role}") or self.remedies.get(code)
        if template is not None:
            paths = {other: home_display(p, self._home) for other, p in self.files.items()}
            return fill_remedy(template, shown, role, paths)
        return default_remedy(code, shown, role)


class SimpleTables:
    """Tables that write only ``name`` and ``files`` (plain paths): most of a large config.

    Validating 10,000 of them one by one through pydantic took most of loading the config,
    though all but their name and paths come out the same. The first table of each set of
    roles is validated in full (in a scratch context: it only serves as a template); each
    such table is then the template with its own name and paths, after the checks those two
    need (a valid, unused name; paths expanded, none twice). A table that is anything else,
    or fails any of those checks, is left to the full validation, which reports it as
    always; ``Config`` hands it every table after that one too.
    """

    def __init__(self, context: LoadContext) -> None:
        self._context = context
        self._templates: dict[tuple[str, ...], CredentialSettings | None] = {}

    def take(self, table: Any) -> CredentialSettings | Any:
        """``table`` validated, or ``table`` itself when the full validation is to see it."""
        if type(table) is not dict or table.keys() != _SIMPLE_KEYS:
            return table
        name, files = table["name"], table["files"]
        if type(name) is not str or type(files) is not dict or not files:
            return table
        for text in files.values():
            if type(text) is not str or not _plain_path(text):
                return table
        context = self._context
        if name in context.seen_names:
            return table
        try:
            check_ident(name, "name")
        except ValueError:
            return table
        template = self._template(tuple(files), files)
        if template is None:
            return table
        try:
            paths = {role: context.expand(text) for role, text in files.items()}
        except ValueError:
            return table
        if len(paths) > 1 and len(set(paths.values())) != len(paths):
            return table
        context.seen_names.add(name)
        return template.model_copy(update={"name": name, "files": paths})

    def _template(
        self, roles: tuple[str, ...], files: dict[str, str]
    ) -> CredentialSettings | None:
        if roles not in self._templates:
            scratch = replace(self._context, seen_names=set())
            try:
                template: CredentialSettings | None = CredentialSettings.model_validate(
                    {"name": "template", "files": files}, context=validation_context(scratch)
                )
            except ValidationError:
                template = None
            self._templates[roles] = template
        return self._templates[roles]


_SIMPLE_KEYS = frozenset({"name", "files"})


def _plain_path(text: str) -> bool:
    # No template, no pattern, nothing the expansion would refuse: taken as written.
    return (
        bool(text)
        and "$" not in text
        and not text.startswith("~")
        and "\0" not in text
        and GLOB_CHARS.isdisjoint(text)
    )
