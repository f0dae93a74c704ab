"""Paths as the user writes them: templates (``~``, ``$VAR``, ``${VAR:-default}``)
and how a path is shown back (with ``~``); patterns are :mod:`broker.core.globs`.

Pure functions over text; what a relative path is taken against is the load context's
business (:mod:`broker.config.context`).
"""

from __future__ import annotations

import pwd
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from broker.config.errors import show

__all__ = ["expand_template", "home_display"]

# --------------------------------------------------------------------------------------------
# Path templates: ~, $VAR, ${VAR}, ${VAR:-default}, $$


@dataclass(frozen=True, slots=True)
class _Tilde:
    user: str  # "" = HOME


@dataclass(frozen=True, slots=True)
class _Var:
    name: str
    default: tuple[_Node, ...] | None  # ${NAME:-default}; None for $NAME / ${NAME}


_Node = str | _Tilde | _Var
_NAME_AT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MALFORMED = 'malformed "${...}"; write ${NAME} or ${NAME:-default} (or $$ for a literal $)'


def expand_template(text: str, env: Mapping[str, str]) -> str:
    """Expand a path template the way a POSIX shell expands a word, on a small grammar.

    - ``~`` or ``~user`` at the start of the text, or at the start of a ``:-`` default:
      ``env["HOME"]`` or that user's home directory;
    - ``$NAME`` and ``${NAME}``: the variable, which must be set and non-empty;
    - ``${NAME:-default}``: the variable if set and non-empty, else ``default``, itself a
      template (``~`` and ``${...}`` expand in it). As in the shell, a default that is not
      needed is not evaluated: an unset variable there is no error;
    - ``$$``: a literal ``$``; any other ``$`` not followed by a name stays as it is.

    Values of variables are used literally (no ``~`` or ``$`` expansion inside them), as a
    shell does. Raises ``ValueError`` with a message naming the problem.
    """
    if "$" not in text and not text.startswith("~"):
        # Most paths hold no template at all: the grammar gives back such a text unchanged,
        # and parsing it character by character was half of loading 10,000 credentials.
        return text
    nodes, end = _parse_template(text, 0, nested=False)
    assert end == len(text)
    return _evaluate(nodes, env, text)


def _parse_template(text: str, pos: int, *, nested: bool) -> tuple[tuple[_Node, ...], int]:
    """Parse from ``pos`` to the end (or, ``nested``, to the ``}`` that closes a default)."""
    nodes: list[_Node] = []
    literal: list[str] = []

    def flush() -> None:
        if literal:
            nodes.append("".join(literal))
            literal.clear()

    if text.startswith("~", pos):
        end = pos + 1
        while end < len(text) and text[end] != "/" and not (nested and text[end] == "}"):
            end += 1
        nodes.append(_Tilde(text[pos + 1 : end]))
        pos = end
    while pos < len(text):
        char = text[pos]
        if nested and char == "}":
            break
        if char != "$":
            literal.append(char)
            pos += 1
            continue
        following = text[pos + 1 : pos + 2]
        if following == "$":
            literal.append("$")
            pos += 2
            continue
        if following == "{":
            match = _NAME_AT.match(text, pos + 2)
            if match is None:
                raise ValueError(_MALFORMED)
            after = match.end()
            if text.startswith("}", after):
                flush()
                nodes.append(_Var(match.group(), None))
                pos = after + 1
                continue
            if text.startswith(":-", after):
                default, close = _parse_template(text, after + 2, nested=True)
                if close >= len(text):
                    raise ValueError(f'unclosed "${{{match.group()}:-..."; add the closing "}}"')
                flush()
                nodes.append(_Var(match.group(), default))
                pos = close + 1
                continue
            raise ValueError(_MALFORMED)
        match = _NAME_AT.match(text, pos + 1)
        if match is None:
            literal.append("$")  # "$" before something that is no name: a literal "$"
            pos += 1
            continue
        flush()
        nodes.append(_Var(match.group(), None))
        pos = match.end()
    flush()
    return tuple(nodes), pos


def _evaluate(nodes: tuple[_Node, ...], env: Mapping[str, str], text: str) -> str:
    out: list[str] = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Tilde):
            if "$" in node.user or "{" in node.user:
                raise ValueError(f'cannot expand "~{node.user}": no such user')
            if node.user:
                try:
                    out.append(pwd.getpwnam(node.user).pw_dir)
                except KeyError:
                    raise ValueError(f'cannot expand "~{node.user}": no such user') from None
            else:
                home = env.get("HOME")
                if not home:
                    raise ValueError(f'cannot expand "~" in {show(text)}: HOME is not set')
                out.append(home)
        else:
            value = env.get(node.name)
            if value:
                out.append(value)
            elif node.default is not None:
                out.append(_evaluate(node.default, env, text))
            elif value is None:
                raise ValueError(f"environment variable ${node.name} is not set")
            else:
                raise ValueError(f"environment variable ${node.name} is empty")
    return "".join(out)


# --------------------------------------------------------------------------------------------
# Showing a path back


def home_display(path: Path, home: str | None) -> str:
    """``path`` with a leading ``home`` written ``~``, the way presets and users write it."""
    text = str(path)
    home = (home or "").rstrip("/")
    if home and text.startswith(home + "/"):
        return "~" + text[len(home) :]
    return text
