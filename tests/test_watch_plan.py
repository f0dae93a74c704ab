"""What the watcher decides to watch for a path: the real directory, and every symlink on it."""

from __future__ import annotations

import os
import random
import tempfile

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from broker.engine.watcher import (
    _SET_FROM,
    _add_path,
    _compact,
    _Dir,
    _discard_path,
    _index,
    _Kind,
    _Paths,
    _plan,
    _PlanCache,
    _resolve,
)

NAMES = ["a", "b", "c", "d"]

# A tree under a fresh directory: each name at the top is a directory or a symlink (to a
# name, to "..", or to a path through another name); a directory may hold the same names.
targets = st.sampled_from(["a", "b", "c", "d", "..", "a/b", "../a", "b/../c", "."])
trees = st.dictionaries(
    st.sampled_from([f"{x}/{y}" for x in NAMES for y in ["", *NAMES]]),
    st.one_of(st.just(None), targets),  # None: a directory
    max_size=8,
)
paths = st.lists(st.sampled_from([*NAMES, ".."]), min_size=1, max_size=5)


def build(root: str, tree: dict[str, str | None]) -> None:
    for name in NAMES:
        # Every top-level name is a directory unless the tree makes it a link.
        if tree.get(f"{name}/") is None:
            os.makedirs(os.path.join(root, name))
    for key, target in sorted(tree.items(), key=lambda kv: kv[0].count("/")):
        where = os.path.join(root, key.rstrip("/"))
        if os.path.lexists(where) or not os.path.isdir(os.path.dirname(where)):
            continue
        if target is None:
            os.makedirs(where)
        else:
            os.symlink(target, where)


@settings(max_examples=150, deadline=None)
@given(tree=trees, parts=paths)
def test_resolve_agrees_with_the_kernel_and_records_every_link(
    tree: dict[str, str | None], parts: list[str]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.realpath(tmp)
        build(root, tree)
        path = os.path.join(root, *parts, "token")
        # Only directories the kernel can reach: through a loop or a missing component the
        # kernel refuses the path, and realpath's answer is arbitrary (nothing to agree with).
        assume(os.path.isdir(os.path.dirname(path)))
        links: set[tuple[str, str]] = set()
        assert _resolve(path, links) == os.path.realpath(path)
        for directory, name in links:
            assert os.path.islink(os.path.join(directory, name))
            assert os.path.realpath(directory) == directory  # watched by its real path


def test_plan_for_a_symlinked_directory() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.realpath(tmp)
        os.mkdir(os.path.join(root, "v1"))
        os.symlink("v1", os.path.join(root, "current"))
        plan = _plan(os.path.join(root, "current", "token"))
        assert plan == {
            (os.path.join(root, "v1"), "token", _Kind.DIRECT),
            (root, "current", _Kind.LINK),
        }
        # A dangling link: the link, and the creation of what it points to, are awaited.
        os.unlink(os.path.join(root, "current"))
        os.symlink("v2/sub", os.path.join(root, "current"))
        assert _plan(os.path.join(root, "current", "token")) == {
            (root, "v2", _Kind.PENDING),
            (root, "current", _Kind.LINK),
        }


def _reference_plan(path: str) -> frozenset[tuple[str, str, _Kind]]:
    """The plan as it was computed before batches shared a cache: every path resolved from
    the root, each on its own (the oracle for the cached one)."""
    path = os.path.abspath(path)
    links: set[tuple[str, str]] = set()
    real_parent, real_name = os.path.split(_resolve(path, links))
    kind = _Kind.DIRECT
    ancestor, child = real_parent, real_name
    while not os.path.isdir(ancestor):
        up = os.path.dirname(ancestor)
        if up == ancestor:
            return frozenset((d, n, _Kind.LINK) for d, n in links)
        ancestor, child = up, os.path.basename(ancestor)
    if ancestor != real_parent:
        kind = _Kind.PENDING
    return frozenset({(ancestor, child, kind), *((d, n, _Kind.LINK) for d, n in links)})


@settings(max_examples=150, deadline=None)
@given(tree=trees, batch=st.lists(paths, min_size=1, max_size=6))
def test_a_batch_of_plans_sharing_a_cache_plans_as_each_alone(
    tree: dict[str, str | None], batch: list[list[str]]
) -> None:
    # Start-up plans 10,000 paths with one cache of resolved directories; whatever the
    # links (chains, "..", loops, dangling, a file name that is itself a link), each plan
    # must be what planning that path alone from the root gives.
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.realpath(tmp)
        build(root, tree)
        cache = _PlanCache()
        for parts in batch:
            # The last component is a name of the tree too: it may be a symlink itself.
            path = os.path.join(root, *parts)
            assert _plan(path, cache) == _reference_plan(path), path


@settings(max_examples=300, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.booleans(), st.sampled_from(["x", "y"]), st.integers(0, 2 * _SET_FROM)),
        max_size=60,
    )
)
def test_the_compact_name_index_holds_what_a_dict_of_sets_would(
    ops: list[tuple[bool, str, int]],
) -> None:
    # Tuples for a few paths, a set from _SET_FROM on: adds and discards in any order must
    # leave exactly the paths a dict of sets holds, with no empty entry left behind.
    index: dict[str, _Paths] = {}
    model: dict[str, set[str]] = {}
    for add, name, number in ops:
        path = f"/p/{number}"
        if add:
            _add_path(index, name, path)
            model.setdefault(name, set()).add(path)
        else:
            _discard_path(index, name, path)
            model.get(name, set()).discard(path)
            if not model.get(name, True):
                del model[name]
        assert {n: set(p) for n, p in index.items()} == model
        for paths in index.values():
            assert len(paths) == len(set(paths))  # a tuple never holds a path twice


def test_a_directory_gets_an_index_of_its_own_only_when_a_name_is_added() -> None:
    first, second = _Dir(), _Dir()
    _add_path(_index(first, _Kind.DIRECT), "token", "/d/token")
    assert first.direct == {"token": ("/d/token",)}
    assert second.direct == {} and first.links == {} and first.empty() is False
    assert second.empty()


@settings(max_examples=100, deadline=None)
@given(
    entries=st.frozensets(
        st.tuples(st.sampled_from(["/a", "/b"]), st.sampled_from(["x", "y"]),
                  st.sampled_from(list(_Kind))),
        max_size=6,
    ),
    seed=st.randoms(),
)
def test_a_kept_plan_is_equal_exactly_when_its_entries_are(
    entries: frozenset[tuple[str, str, _Kind]], seed: random.Random
) -> None:
    # The same entries built in another order (another set's iteration) keep the same plan.
    shuffled = list(entries)
    seed.shuffle(shuffled)
    assert _compact(frozenset(shuffled)) == _compact(entries)
    assert set(_compact(entries)) == entries
    assert _compact(entries) != _compact(entries | {("/c", "z", _Kind.DIRECT)})


def test_plans_of_one_batch_share_their_directory_string() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.realpath(tmp)
        cache = _PlanCache()
        (one,), (two,) = (_plan(os.path.join(root, n), cache) for n in ("t1", "t2"))
        assert one[0] == two[0] == root and one[0] is two[0]
