"""The config loader's fast paths give exactly what the plain code they replaced gave: a path
with no template in it, and the "pattern in the directory part" check."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from broker.config import paths
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
