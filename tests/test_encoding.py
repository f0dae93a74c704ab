"""The one JSON encoding (broker.core.events.encode): orjson, the same document as the stdlib's."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from broker.core.events import encode

# Documents as the broker builds them: no floats (times are strings), 64-bit integers.
_scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text()
_docs = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


def _stdlib(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


@given(_docs)
def test_byte_identical_to_the_stdlib_encoding(doc: Any) -> None:
    try:
        expected = _stdlib(doc)
    except UnicodeEncodeError:  # a lone surrogate: neither encodes it
        return
    assert encode(doc) == expected


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_floats_keep_their_value(value: float) -> None:
    # The exponent may be spelt differently (1e-7 against 1e-07), the number never.
    assert json.loads(encode({"x": value})) == {"x": value}


def test_what_orjson_refuses_still_encodes() -> None:
    assert encode({"big": 2**70}) == b'{"big":1180591620717411303424}'
    assert encode({1: "a"}) == b'{"1":"a"}'


def test_an_encoding_holds_no_more_memory_than_its_bytes() -> None:
    # orjson's own result keeps its 8 KiB buffer; 10,000 retained payloads were 80 MB.
    import tracemalloc

    doc = {"a": "x" * 900}
    tracemalloc.start()
    try:
        kept = [encode(doc) for _ in range(200)]
        used, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(kept[0]) == 908
    assert used < 200 * 1200
