"""The field types the config models are built from, and their common base :class:`Model`.

Each type is an ``Annotated`` pydantic type over a parser of :mod:`broker.config.scalars` (or
of the core: expiry sources, selectors), so a model says ``timeout: PositiveDuration`` and
the parsing and its messages live in one place.
"""

from __future__ import annotations

from pathlib import Path, PurePath
from typing import Annotated, Any, ClassVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    PlainSerializer,
    PlainValidator,
    ValidationInfo,
)

from broker.config import scalars
from broker.config.context import context_of
from broker.config.errors import Located, errors_at, show
from broker.config.preset_merge import PresetPathRequired
from broker.core.expiry import ExpirySource, parse_expiry_source
from broker.core.formats import Selector, parse_selector

__all__ = [
    "Buffer",
    "Duration",
    "ExpandedPath",
    "ExpiryField",
    "Fraction",
    "Model",
    "ParameterValue",
    "PositiveDuration",
    "RoleName",
    "SelectorField",
    "Size",
    "StatusCode",
    "StrictBoolField",
]


class Model(BaseModel):
    """What every config table is: closed (unknown keys are errors) and immutable."""

    # hide_input_in_errors: should a raw pydantic error ever be printed, it must not carry a
    # value that could be a secret.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    #: Fields that are no key of the table (set by the loader, or written otherwise): left
    #: out of the "did you mean" hints of :mod:`broker.config.errors`.
    hidden_keys: ClassVar[frozenset[str]] = frozenset()


def _path(value: Any, info: ValidationInfo) -> Path:
    if isinstance(value, PresetPathRequired):
        raise ValueError(
            f"preset {show(value.preset)} has no default path for role {show(value.role)}; "
            f'set it: files = {{ {value.role} = "/path/to/file" }}'
        )
    if isinstance(value, PurePath):
        value = str(value)
    if not isinstance(value, str):
        raise ValueError("expected a path (a string)")
    return context_of(info).expand(value)


_EXPIRY_EXPECTED = "jwt, json:<path>, ini:<section>.<key>, pem, ttl:<duration>, none"
# Sources that always answer (never "no-expiry"): nothing after one of them could be reached.
_FINAL_SOURCES = frozenset({"none", "ttl", "pem"})


def _expiry(value: Any) -> ExpirySource:
    if isinstance(value, ExpirySource):
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a string: {_EXPIRY_EXPECTED}")
    source = parse_expiry_source(value)  # its ValueError message is shown verbatim
    if source.kind == "ttl" and source.ttl > scalars.MAX_DURATION:
        raise ValueError(f"source {show(value)}: the duration is too long (at most 3650d)")
    return source


def _expiry_sources(value: Any) -> tuple[ExpirySource, ...]:
    """``expiry = "jwt"`` or ``expiry = ["ini:p.a", "ini:p.b", "none"]`` (tried in order)."""
    if isinstance(value, str | ExpirySource):
        return (_expiry(value),)
    if not isinstance(value, list | tuple):
        raise ValueError(
            f"expected a string ({_EXPIRY_EXPECTED}) or an array of them, tried in order"
        )
    if not value:
        raise ValueError("must not be empty")
    sources: list[ExpirySource] = []
    problems: list[Located] = []
    for index, item in enumerate(value):
        try:
            sources.append(_expiry(item))
        except ValueError as exc:
            problems.append(((index,), str(exc)))
    if problems:
        raise errors_at(problems)
    for index, source in enumerate(sources[:-1]):
        if source.kind in _FINAL_SOURCES:
            raise errors_at(
                [
                    (
                        (index + 1,),
                        f"unreachable: source {show(str(source))} always answers, "
                        "so nothing after "
                        "it is ever tried; put it last",
                    )
                ]
            )
    return tuple(sources)


def _serialize_expiry(sources: tuple[ExpirySource, ...]) -> str | list[str]:
    texts = [str(source) for source in sources]
    return texts[0] if len(texts) == 1 else texts


def _selector(value: Any) -> Selector:
    if isinstance(value, Selector):
        return value
    if not isinstance(value, str):
        raise ValueError('expected a string such as "ini-section:default"')
    return parse_selector(value)


ExpandedPath = Annotated[Path, BeforeValidator(_path)]
Duration = Annotated[float, BeforeValidator(scalars.duration)]
PositiveDuration = Annotated[float, BeforeValidator(scalars.positive_duration)]
Fraction = Annotated[float, BeforeValidator(scalars.fraction)]
Size = Annotated[int, BeforeValidator(scalars.size)]
Buffer = Annotated[int, BeforeValidator(scalars.buffer)]
StatusCode = Annotated[int, BeforeValidator(scalars.status_code)]
# Plain: never accept ExpirySource's dataclass fields as a TOML table; dump back as text.
ExpiryField = Annotated[
    tuple[ExpirySource, ...],
    PlainValidator(_expiry_sources),
    PlainSerializer(_serialize_expiry, return_type=str | list[str]),
]
SelectorField = Annotated[
    Selector, PlainValidator(_selector), PlainSerializer(str, return_type=str)
]
ParameterValue = Annotated[str, PlainValidator(scalars.parameter)]
StrictBoolField = Annotated[bool, BeforeValidator(scalars.strict_bool)]
# Checked as a dict key so a bad role name is reported even when its path is bad too.
RoleName = Annotated[str, AfterValidator(lambda value: scalars.check_ident(value, "role name"))]
