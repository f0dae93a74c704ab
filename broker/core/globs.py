"""File-name patterns: which configured paths are patterns, and which names they match.

A pattern is allowed in the last component of a path only (``~/.aws/sso/cache/*.json``).
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import PurePath

__all__ = ["GLOB_CHARS", "glob_matches", "is_glob"]

#: The characters that make a path component a pattern.
GLOB_CHARS = frozenset("*?[")


def is_glob(path: str | PurePath) -> bool:
    """True when the last component of ``path`` holds ``*``, ``?`` or ``[``."""
    text = str(path)
    # Asked per file per event: most paths have none of the characters anywhere, which
    # three substring searches tell without splitting the path.
    if "*" not in text and "?" not in text and "[" not in text:
        return False
    return not GLOB_CHARS.isdisjoint(os.path.basename(text))


def glob_matches(name: str, pattern: str) -> bool:
    """Whether file ``name`` matches the last-component ``pattern``, as the shell's glob says.

    As in the shell, a name starting with ``.`` matches only a pattern starting with ``.``:
    that keeps the hidden temporary files of atomic writers (``.token.tmp-1234``) out.
    """
    if name.startswith(".") and not pattern.startswith("."):
        return False
    return fnmatch.fnmatchcase(name, pattern)
