"""What one load of the config validates against: the environment, the base directory of
relative paths, the preset registry, the credential names seen so far, and what the
credentials inherit from ``[broker]``.

The loader hands a :class:`LoadContext` to pydantic as its validation context, and the
validators read it through :func:`context_of`; nothing here is global, so two loads (a test's
and a reload) never share anything.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import ValidationInfo

from broker.config.errors import show
from broker.config.paths import expand_template
from broker.config.presets import PRESETS, Preset

__all__ = ["LoadContext", "context_of", "validation_context"]

_CTX_KEY = "credbroker"


@dataclass
class LoadContext:
    """Passed to validators through pydantic's validation context."""

    env: Mapping[str, str]
    base_dir: Path | None  # None: the cwd, looked up only if a relative path needs it
    presets: Mapping[str, Preset] = field(default_factory=lambda: PRESETS)
    seen_names: set[str] = field(default_factory=set)
    #: ``[broker] strict_permissions``, once validated (``[broker]`` comes first): what a
    #: credential that does not say takes (``None``: not known, as for a credential built
    #: alone in Python).
    strict_permissions: bool | None = None

    @cached_property
    def home(self) -> str | None:
        """``HOME`` of ``env`` (``None`` when unset or empty), looked up once per load."""
        return self.env.get("HOME") or None

    def expand(self, text: str) -> Path:
        """``~``, ``$VARS``, then relative-to-base. Raises ValueError with a user message."""
        if not text:
            raise ValueError("the path is empty")
        if "\0" in text:
            raise ValueError("the path contains a NUL character")
        expanded = expand_template(text, self.env)
        if not expanded or "\0" in expanded:
            raise ValueError(f"{show(text)} expands to an empty or invalid path")
        path = Path(expanded)
        if not path.is_absolute():
            try:
                base = self.base_dir if self.base_dir is not None else Path(os.getcwd())
            except OSError:
                raise ValueError(f"{show(text)} is relative and the cwd is unknown") from None
            path = base / path
        return path


def validation_context(context: LoadContext) -> dict[str, Any]:
    """``context`` as pydantic's ``model_validate(..., context=...)`` argument."""
    return {_CTX_KEY: context}


def context_of(info: ValidationInfo) -> LoadContext:
    """The load context a validator runs in."""
    context = info.context
    if isinstance(context, Mapping):
        found = context.get(_CTX_KEY)
        if isinstance(found, LoadContext):
            return found
    # Models built directly in Python (tests, embedding) expand from the real environment.
    return LoadContext(os.environ, None)
