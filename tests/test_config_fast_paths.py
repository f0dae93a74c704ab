"""The config loader's fast paths give exactly what the plain code they replaced gave: a path
with no template in it, the "pattern in the directory part" check, and tables of only a name
and plain files (the same settings, or the same errors)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from broker.config import ConfigError, parse_config, paths
from broker.core.globs import GLOB_CHARS

_ENV = {"HOME": "/home/u", "A": "/a", "EMPTY": ""}


def _parsed(text: str) -> str:
    nodes, end = paths._parse_template(text, 0, nested=False)
    assert end == len(text)
    return paths._evaluate(nodes, _ENV, text)


@given(st.text(alphabet="/~$ab{}:-.x_", max_size=30))
def test_a_plain_path_expands_as_the_parser_expands_it(text: str) -> None:
    try:
        expected: str | type[ValueError] = _parsed(text)
    except ValueError:
        expected = ValueError
    try:
        got: str | type[ValueError] = paths.expand_template(text, _ENV)
    except ValueError:
        got = ValueError
    assert got == expected


@given(st.text(alphabet="/ab*?[].x", min_size=1, max_size=30))
def test_a_pattern_in_the_directory_part_is_found_as_before(text: str) -> None:
    path = Path(text)
    before = any(not GLOB_CHARS.isdisjoint(part) for part in path.parent.parts)
    assert (not GLOB_CHARS.isdisjoint(os.path.dirname(path))) == before


_NAMES = st.sampled_from(["a", "b", "c", "d", "nebius", "Bad", "", 7])
_ROLES = st.sampled_from(["token", "key", "Bad"])
_PATHS = st.one_of(
    st.sampled_from(["/p/a", "/p/b", "rel/x", "/p/../p/a", "/p/x*"]),
    st.sampled_from(["", "/p/*/x", "$HOME/x", "~/y", "a\0b", 3]),
)
_FILES = st.one_of(
    st.fixed_dictionaries({"token": _PATHS}),
    st.fixed_dictionaries({"token": _PATHS, "key": _PATHS}),
    st.dictionaries(_ROLES, _PATHS, max_size=2),
)
_SIMPLE = st.fixed_dictionaries({"name": _NAMES, "files": _FILES})
_TABLES = st.one_of(
    _SIMPLE,
    _SIMPLE,
    _SIMPLE,
    st.fixed_dictionaries({"files": _FILES}),
    st.fixed_dictionaries({"preset": st.just("nebius")}, optional={"name": _NAMES}),
)


def _outcome(document: dict[str, Any]) -> Any:
    try:
        config = parse_config(document, env=_ENV, source_path=Path("/etc/cb/broker.toml"))
    except ConfigError as exc:
        return ("errors", exc.errors)
    return [
        (c.model_dump(), c._home, c.model_fields_set - {"format"}) for c in config.credentials
    ]


@settings(max_examples=400)
@given(st.lists(_TABLES, max_size=6), st.booleans())
@example([{"name": "a", "files": {"token": "/p/a", "key": "/p/a"}}], False)
@example([{"name": "a", "files": {"token": "/p/a", "key": "/p/b"}},
          {"name": "b", "files": {"token": "/p/a", "key": "/p/a"}}], False)
@example([{"name": "a", "files": {"token": "/p/a"}}, {"name": "b", "files": {"token": "/p/*/x"}}],
         False)
@example([{"name": "a", "files": {"token": "/p/a"}}, {"name": "a", "files": {"token": "/p/b"}}],
         True)
@example([{"preset": "nebius"}, {"name": "nebius", "files": {"token": "/p/a"}}], True)
def test_simple_tables_come_out_as_fully_validated_ones(
    tables: list[dict[str, Any]], strict: bool
) -> None:
    broker = {"state_dir": "/var/lib/cb", "host_id": "h", "strict_permissions": strict}
    fast = _outcome({"broker": broker, "credentials": tables})
    # An explicit default value keeps a table out of the fast path, and changes nothing else.
    full = [
        {**t, "format": "text"} if t.keys() == {"name", "files"} else t for t in tables
    ]
    assert fast == _outcome({"broker": broker, "credentials": full})
