"""inotify on the parent directories of credential files.

Never on the files themselves: a rename over a file (the usual atomic update) ends a watch
on it. Each directory holding a watched file is watched non-recursively; a directory that
does not exist yet is awaited by watching its nearest existing ancestor. Every symlink the
path resolves through (the Kubernetes ``..data`` pattern, a ``current -> v1`` directory) has
its own directory watched for that name, and the file is watched in the directory it really
lives in: re-pointing any of those links re-plans the watches at once.

The watcher only says "these paths may have changed". Whether they did is decided by
content hash in the engine. What the watcher adds is *when* to look: after a writer
closes the file (close-write) or a new version is moved in, never in the middle of a
write. ``writing`` tells the engine which files a writer has modified and not yet closed,
and ``modified_at`` when it last did, so a writer that keeps the file open can still be
published once its content holds still.

A path whose last component is a pattern (``~/.aws/sso/cache/*.json``) stands for every file
matching it: its directory is watched, and any such event on a matching name (one created,
closed after writing, moved in, deleted or moved away) is reported as a change of the
pattern itself, the path the engine knows.

Events are filtered by name before any other work: a directory shared with busy unrelated
files costs one dictionary look-up per event, and the count of such events per directory
(:meth:`Watcher.take_noise`) lets the engine report a directory that floods the broker.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType, TracebackType

import anyio
from asyncinotify import Mask

from broker.core.globs import glob_matches, is_glob
from broker.engine.inotify import HEADER, Inotify

log = logging.getLogger("broker.watcher")

# Plain ints: IntFlag arithmetic costs microseconds, and this is the per-event path.
_MODIFY = int(Mask.MODIFY)
_ATTRIB = int(Mask.ATTRIB)
_CLOSE_WRITE = int(Mask.CLOSE_WRITE)
_CREATE = int(Mask.CREATE)
_DELETE = int(Mask.DELETE)
_MOVED_TO = int(Mask.MOVED_TO)
_MOVED_FROM = int(Mask.MOVED_FROM)
_ISDIR = int(Mask.ISDIR)
_Q_OVERFLOW = int(Mask.Q_OVERFLOW)
_DIR_MASK = int(
    Mask.CLOSE_WRITE
    | Mask.MOVED_TO
    | Mask.MOVED_FROM
    | Mask.CREATE
    | Mask.DELETE
    | Mask.ATTRIB
    | Mask.MODIFY
    | Mask.DELETE_SELF
    | Mask.MOVE_SELF
    | Mask.ONLYDIR
)
_GONE = int(Mask.IGNORED | Mask.DELETE_SELF | Mask.MOVE_SELF)
_NAME_CHANGES = _CREATE | _MOVED_TO | _DELETE | _MOVED_FROM
#: Symlinks followed while planning before the path counts as a loop (the kernel's limit).
_MAX_LINKS = 40

#: ``notify(paths, scan)``: ``scan`` is True when the paths were found by looking (a new
#: directory, a file created or linked in, a queue overflow) rather than by a writer's
#: close, so a writer may still be busy with them.
Notify = Callable[[set[str], bool], None]


class _Kind(Enum):
    DIRECT = "direct"  # the file's own name in the directory it really lives in
    LINK = "link"  # a symlink the path resolves through, by its name in its directory
    PENDING = "pending"  # the next missing path component under the nearest existing ancestor
    GLOB = "glob"  # any name matching a pattern in the file's directory


#: The watched paths one name of a directory stands for: a tuple while there are few (nearly
#: always one; a one-element set costs 216 bytes, the tuple 48), a set from
#: :data:`_SET_FROM` on (many paths behind one link or missing directory stay linear).
_Paths = tuple[str, ...] | set[str]
_SET_FROM = 8
#: What a directory's unused indexes are until a name is added to one: most directories
#: hold direct names only, and three empty dicts per directory were 1.9 MB at 10,000.
_NO_NAMES: Mapping[str, _Paths] = MappingProxyType({})


def _no_names() -> Mapping[str, _Paths]:
    return _NO_NAMES


@dataclass(slots=True)
class _Dir:
    wd: int | None = None
    direct: Mapping[str, _Paths] = field(default_factory=_no_names)
    pending: Mapping[str, _Paths] = field(default_factory=_no_names)
    links: Mapping[str, _Paths] = field(default_factory=_no_names)
    globs: Mapping[str, _Paths] = field(default_factory=_no_names)  # pattern -> its paths

    def empty(self) -> bool:
        return not (self.direct or self.pending or self.links or self.globs)

    def named(self, name: str) -> set[str]:
        """The watched paths that ``name`` in this directory is (or matches)."""
        found = set(self.direct.get(name, ()))
        for pattern, paths in self.globs.items():
            if glob_matches(name, pattern):
                found.update(paths)
        return found

    def interest(self) -> Collection[bytes] | None:
        """The names worth an event here; ``None`` when a pattern makes every name one.

        A tuple for a few names (a one-name frozenset is 216 bytes, the tuple 48, and a
        comparison or two is as quick as a hash), a frozenset beyond.
        """
        if self.globs:
            return None
        names = tuple(os.fsencode(n) for n in (*self.direct, *self.pending, *self.links))
        return names if len(names) < _SET_FROM else frozenset(names)


def _add_path(index: dict[str, _Paths], name: str, path: str) -> None:
    paths = index.get(name, ())
    if isinstance(paths, set):
        paths.add(path)
    elif path not in paths:
        index[name] = (*paths, path) if len(paths) + 1 < _SET_FROM else {*paths, path}


def _discard_path(index: dict[str, _Paths], name: str, path: str) -> None:
    paths = index.get(name)
    if paths is None:
        return
    if isinstance(paths, set):
        paths.discard(path)
        rest: _Paths = paths
    else:
        rest = tuple(p for p in paths if p != path)
        index[name] = rest
    if not rest:
        del index[name]


_Entry = tuple[str, str, _Kind]
#: A path's watches as kept: a sorted tuple (a frozenset of one entry costs 216 bytes, the
#: tuple 48), so that two plans compare equal exactly when they hold the same entries.
_Plan = tuple[_Entry, ...]


def _compact(plan: frozenset[_Entry]) -> _Plan:
    if len(plan) < 2:
        return tuple(plan)
    return tuple(sorted(plan, key=lambda e: (e[0], e[1], e[2].value)))


class Watcher:
    """Watches a set of file paths and calls ``notify`` when any of them may have changed."""

    def __init__(
        self,
        notify: Notify,
        on_writing: Callable[[], None] | None = None,
        *,
        on_polled: Callable[[], None] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        pace: Callable[[], float] | None = None,
    ) -> None:
        self._notify = notify
        self._monotonic = monotonic
        # Seconds to wait after handling a read before the next one (0: none).
        self._pace = pace
        self._on_writing = on_writing
        # Told when a path joins ``polled``: the poll loop sleeps while there is none.
        self._on_polled = on_polled
        self._inotify: Inotify | None = None
        self._plans: dict[str, _Plan] = {}
        self._dirs: dict[str, _Dir] = {}
        self._watch_dirs: dict[int, str] = {}
        #: watch descriptor -> names worth handling (``None``: all, a pattern is watched).
        self._interest: dict[int, Collection[bytes] | None] = {}
        #: watch descriptor -> events for names nothing watches, since the last take_noise.
        self._noise: dict[int, int] = {}
        #: Paths modified by a writer that has not closed them yet.
        self.writing: set[str] = set()
        #: When each path in ``writing`` was last modified (the ``monotonic`` clock).
        self.modified_at: dict[str, float] = {}
        #: Paths the kernel would not watch (limit reached, no permission): poll them.
        self.polled: set[str] = set()
        #: Watch failures and event-handling errors, for metrics.
        self.errors = 0
        #: Events the name filter dropped, up to the last take_noise (see unrelated_total).
        self.unrelated = 0
        #: Queue overflows seen.
        self.overflows = 0

    def __enter__(self) -> Watcher:
        self._inotify = Inotify()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None

    @property
    def polled_dirs(self) -> set[str]:
        """The directories of :attr:`polled` (for reports; empty in the common case)."""
        return {os.path.dirname(p) for p in self.polled}

    @property
    def watch_count(self) -> int:
        return sum(1 for d in self._dirs.values() if d.wd is not None)

    def watch(self, paths: Iterable[str]) -> None:
        """Make ``paths`` the set of watched files (added and removed as needed)."""
        wanted = set(paths)
        touched: set[str] = set()
        for path in list(self._plans):
            if path not in wanted:
                self._apply(path, frozenset(), touched)
        self._replan_all(wanted, touched)

    def hold(self, paths: Iterable[str]) -> None:
        """Mark ``paths`` as held by a writer (found so by ``/proc``, not by an event)."""
        now = self._monotonic()
        added = False
        for path in paths:
            if path in self._plans:
                self.writing.add(path)
                self.modified_at[path] = now
                added = True
        if added and self._on_writing is not None:
            self._on_writing()

    def release(self, paths: Iterable[str]) -> None:
        """Forget that a writer holds ``paths`` (it is gone, or its content held still)."""
        for path in paths:
            self.writing.discard(path)
            self.modified_at.pop(path, None)

    def take_noise(self) -> dict[str, int]:
        """Events for unrelated names per directory since the last call (and reset)."""
        noise, self._noise = self._noise, {}
        out: dict[str, int] = {}
        for wd, count in noise.items():
            self.unrelated += count
            directory = self._watch_dirs.get(wd)
            if directory is not None:
                out[directory] = out.get(directory, 0) + count
        return out

    def paths_in(self, directory: str) -> set[str]:
        """The watched paths whose files live in ``directory`` (by name or pattern)."""
        entry = self._dirs.get(directory)
        if entry is None:
            return set()
        found: set[str] = set()
        for group in (entry.direct, entry.globs):
            for paths in group.values():
                found.update(paths)
        return found

    async def run(self) -> None:
        """Read inotify events forever (cancel to stop)."""
        assert self._inotify is not None, "use the Watcher as a context manager"
        while True:
            buffer = await self._inotify.read()
            try:
                self._handle_buffer(buffer)
            except Exception:
                # A bug here must not stop the daemon: the resync safety net still runs.
                self.errors += 1
                log.exception("inotify event handling failed")
            delay = self._pace() if self._pace is not None else 0.0
            if delay > 0:
                # The engine takes a burst in passes some way apart: reading faster than
                # that only wakes the loop for a few events at a time. The kernel queues
                # what arrives meanwhile (16,384 events by default, seconds of a writer).
                await anyio.sleep(delay)

    # -- planning -------------------------------------------------------------------------

    def _replan(self, path: str) -> None:
        self._apply(path, _plan(path))

    def _replan_all(self, paths: Iterable[str], touched: set[str] | None = None) -> None:
        """Replan many paths, then recompute each touched directory's name filter once
        (per path, it was 10,000 x 100 names for 10,000 files in 100 directories)."""
        touched = set() if touched is None else touched
        cache = _PlanCache()
        for path in paths:
            self._apply(path, _plan(path, cache), touched)
        self._refresh_interest(touched)

    def _apply(
        self, path: str, plan: frozenset[_Entry], batch: set[str] | None = None
    ) -> None:
        """Make ``plan`` the watches of ``path``. With ``batch``, the directories touched are
        added to it for the caller to refresh (:meth:`_refresh_interest`)."""
        old = self._plans.get(path, ())
        compact = _compact(plan)
        if compact == old and path not in self.polled:
            return
        touched: set[str] = set() if batch is None else batch
        for directory, name, kind in old:
            if (directory, name, kind) in plan:
                continue
            entry = self._dirs.get(directory)
            if entry is None:
                continue
            index = getattr(entry, _INDEX_OF[kind])
            if isinstance(index, dict):
                _discard_path(index, name, path)
            if entry.empty():
                self._unwatch(directory)
            else:
                touched.add(directory)
        if plan:
            self._plans[path] = compact
        else:
            self._plans.pop(path, None)
            self.polled.discard(path)
            self.release((path,))
        polled = False
        for directory, name, kind in plan:
            entry = self._dirs.setdefault(directory, _Dir())
            _add_path(_index(entry, kind), name, path)
            touched.add(directory)
            if entry.wd is None and not self._add_watch(directory, entry):
                polled = True
        if batch is None:
            self._refresh_interest(touched)
        if polled:
            if path not in self.polled and self._on_polled is not None:
                self._on_polled()
            self.polled.add(path)
        elif plan:
            self.polled.discard(path)

    def _refresh_interest(self, directories: Iterable[str]) -> None:
        for directory in directories:
            entry = self._dirs.get(directory)
            if entry is not None and entry.wd is not None:
                self._interest[entry.wd] = entry.interest()

    def _add_watch(self, directory: str, entry: _Dir) -> bool:
        assert self._inotify is not None
        try:
            wd = self._inotify.add_watch(directory, _DIR_MASK)
        except OSError as exc:
            self.errors += 1
            if exc.errno == errno.ENOSPC:
                log.warning(
                    "inotify watch limit reached; polling instead",
                    extra={"directory": directory, "hint": "raise fs.inotify.max_user_watches"},
                )
            else:
                log.warning(
                    "cannot watch directory; polling instead",
                    extra={"directory": directory, "error": exc.strerror},
                )
            return False
        entry.wd = wd
        self._watch_dirs[wd] = directory
        return True

    def _unwatch(self, directory: str) -> None:
        entry = self._dirs.pop(directory, None)
        if entry is None or entry.wd is None or self._inotify is None:
            return
        self._watch_dirs.pop(entry.wd, None)
        self._interest.pop(entry.wd, None)
        self._noise.pop(entry.wd, None)
        # The kernel may already have dropped it (directory deleted).
        with contextlib.suppress(OSError):
            self._inotify.rm_watch(entry.wd)

    # -- events ---------------------------------------------------------------------------

    def _handle_buffer(self, buffer: bytes) -> None:
        # The name filter comes first and is inlined: everything else is per *relevant*
        # event, this loop is per event the kernel sends.
        interest = self._interest
        noise = self._noise
        unpack = HEADER.unpack_from
        size = HEADER.size
        offset, end = 0, len(buffer)
        while offset < end:
            wd, mask, _cookie, length = unpack(buffer, offset)
            offset += size
            if length:
                name = buffer[offset : offset + length].rstrip(b"\0")
                offset += length
                names = interest.get(wd, _NOTHING)
                if names is not None and name not in names:
                    noise[wd] = noise.get(wd, 0) + 1
                    continue
            else:
                name = b""
            self._handle(wd, mask, name)

    @property
    def unrelated_total(self) -> int:
        """Events the name filter dropped since the watcher started."""
        return self.unrelated + sum(self._noise.values())

    def _handle(self, wd: int, mask: int, raw_name: bytes) -> None:
        if log.isEnabledFor(logging.DEBUG):
            entry_name = os.fsdecode(raw_name)
            log.debug("inotify", extra={"mask": hex(mask), "entry": entry_name, "wd": wd})
        if mask & _Q_OVERFLOW:
            self.overflows += 1
            log.warning("inotify queue overflowed; re-reading every watched file")
            # A writer's close-write may be among the lost events: what is still held open is
            # asked of /proc again by the re-read, not trusted from before.
            self.writing.clear()
            self.modified_at.clear()
            paths = set(self._plans)
            self._replan_all(paths)
            self._notify(paths, True)
            return
        directory = self._watch_dirs.get(wd)
        if directory is None:
            return
        entry = self._dirs.get(directory)
        if entry is None:
            return
        if mask & _GONE:
            self._directory_gone(directory, entry)
            return
        if not raw_name:
            return
        name = os.fsdecode(raw_name)
        settled: set[str] = set()
        scanned: set[str] = set()
        # Copies: replanning edits these very sets.
        pending = entry.pending.get(name)
        if pending and mask & (_CREATE | _MOVED_TO):
            pending = set(pending)
            for path in pending:
                self._replan(path)
            scanned |= pending
        direct = entry.named(name)
        if direct:
            if mask & _MODIFY:
                self.writing |= direct
                now = self._monotonic()
                for path in direct:
                    self.modified_at[path] = now
                if self._on_writing is not None:
                    self._on_writing()
            elif mask & _CREATE and not mask & _ISDIR:
                # A writer's open(O_CREAT) or a link(2): only /proc can tell which, so the
                # engine reads it as found by a scan (held back while a writer has it open).
                self._released(direct)
                if _plan_may_change(self._plans, direct, mask, directory, name):
                    for path in direct:
                        self._replan(path)
                scanned |= direct
            else:
                if mask & (_CLOSE_WRITE | _NAME_CHANGES):
                    self._released(direct)
                if mask & _NAME_CHANGES and _plan_may_change(
                    self._plans, direct, mask, directory, name
                ):
                    for path in direct:
                        self._replan(path)
                settled |= direct
        if mask & _NAME_CHANGES:
            linked = entry.links.get(name)
            if linked:
                linked = set(linked)
                for path in linked:
                    self._replan(path)
                settled |= linked
        if scanned:
            self._notify(scanned, True)
        if settled - scanned:
            self._notify(settled - scanned, False)

    def _released(self, paths: set[str]) -> None:
        # :meth:`release` on the event path, where mostly no writer holds anything.
        if self.writing or self.modified_at:
            self.release(paths)

    def _directory_gone(self, directory: str, entry: _Dir) -> None:
        # Moved away or deleted: what was watched there now lives (or not) somewhere else.
        self._unwatch(directory)
        affected: set[str] = set()
        for group in (entry.direct, entry.pending, entry.globs, entry.links):
            for paths in group.values():
                affected.update(paths)
        self._dirs.pop(directory, None)
        for path in affected:
            self._plans.pop(path, None)
            self._replan(path)
        if affected:
            self._notify(affected, False)


_NOTHING: frozenset[bytes] = frozenset()


def _plan_may_change(
    plans: dict[str, _Plan], paths: set[str], mask: int, directory: str, name: str
) -> bool:
    # A plain file renamed over a plain file (the common rotation) keeps its plan;
    # replanning costs stats on the hot path, so only links and directories get one.
    if mask & _ISDIR or any(
        kind is _Kind.LINK for path in paths for _, _, kind in plans.get(path, ())
    ):
        return True
    return bool(mask & (_CREATE | _MOVED_TO)) and _is_link(f"{directory}/{name}")


def _is_link(path: str) -> bool:
    """``os.path.islink`` without its generic path handling (one lstat per rename)."""
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except (OSError, ValueError):
        return False


def _index(entry: _Dir, kind: _Kind) -> dict[str, _Paths]:
    """The index of ``entry`` for ``kind``, made a dict of its own if it was not one yet."""
    attribute = _INDEX_OF[kind]
    index = getattr(entry, attribute)
    if not isinstance(index, dict):
        index = {}
        setattr(entry, attribute, index)
    return index


_INDEX_OF = {
    _Kind.DIRECT: "direct",
    _Kind.PENDING: "pending",
    _Kind.LINK: "links",
    _Kind.GLOB: "globs",
}


@dataclass(slots=True)
class _PlanCache:
    """What one batch of plans learns about directories: many files share a directory, and
    resolving it walks every component with a ``readlink`` (six per file otherwise)."""

    #: directory -> (its real path, the symlinks met resolving it)
    resolved: dict[str, tuple[str, frozenset[tuple[str, str]]]] = field(default_factory=dict)
    is_dir: dict[str, bool] = field(default_factory=dict)
    #: One string per directory for every plan of the batch: each path's own copy of its
    #: directory's name was 0.9 MB at 10,000 files in 100 directories.
    strings: dict[str, str] = field(default_factory=dict)

    def share(self, text: str) -> str:
        """The batch's one string equal to ``text``."""
        return self.strings.setdefault(text, text)

    def resolve(self, directory: str, links: set[tuple[str, str]]) -> str:
        """:func:`_resolve` of an absolute, normalised ``directory``, its parent from the
        cache (the fold over components, one ``readlink`` per directory not yet seen)."""
        known = self.resolved.get(directory)
        if known is None:
            parent, name = os.path.split(directory)
            met: set[tuple[str, str]] = set()
            if not name:  # the root
                real = _resolve(directory, met)
            else:
                real = _resolve_name(self.resolve(parent, met), name, met)
            known = self.resolved[directory] = (real, frozenset(met))
        links |= known[1]
        return known[0]

    def isdir(self, path: str) -> bool:
        known = self.is_dir.get(path)
        if known is None:
            known = self.is_dir[path] = os.path.isdir(path)
        return known


def _plan(path: str, cache: _PlanCache | None = None) -> frozenset[_Entry]:
    """Which (directory, name) pairs to watch so that any change to ``path`` is seen.

    ``cache`` shares what a batch of plans (all taken at one moment) found out about the
    directories.
    """
    path = os.path.abspath(path)
    links: set[tuple[str, str]] = set()
    parent, name = os.path.split(path)
    cache = cache or _PlanCache()
    # _resolve is a left fold over the components: the parent's result, then the name.
    real_dir = cache.resolve(parent, links)
    if is_glob(name):
        # Matches are taken as they are; a symlinked match's target directory is not watched.
        real_parent, real_name, kind = real_dir, name, _Kind.GLOB
    else:
        real_parent, real_name = os.path.split(_resolve_name(real_dir, name, links))
        kind = _Kind.DIRECT
    # A directory that does not exist (yet), maybe behind a dangling link: wait for its
    # first missing component under the nearest existing ancestor.
    ancestor, child = real_parent, real_name
    while not cache.isdir(ancestor):
        up = os.path.dirname(ancestor)
        if up == ancestor:
            return frozenset((cache.share(d), n, _Kind.LINK) for d, n in links)
        ancestor, child = up, os.path.basename(ancestor)
    if ancestor != real_parent:
        kind = _Kind.PENDING
    return frozenset({
        (cache.share(ancestor), child, kind),
        *((cache.share(d), n, _Kind.LINK) for d, n in links),
    })


def _resolve_name(resolved: str, name: str, links: set[tuple[str, str]]) -> str:
    """:func:`_resolve` of ``resolved/name`` where ``resolved`` is a real path already."""
    candidate = os.path.join(resolved, name)
    try:
        target = os.readlink(candidate)
    except OSError:
        return candidate  # not a symlink (or not there): taken as it is
    links.add((resolved, name))
    return _resolve(os.path.join(resolved, target), links, 1)


def _resolve(path: str, links: set[tuple[str, str]], depth: int = 0) -> str:
    """The real path of ``path``, adding (directory, name) of every symlink met on the way."""
    resolved = "/"
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            resolved = os.path.dirname(resolved)
            continue
        candidate = os.path.join(resolved, part)
        try:
            target = os.readlink(candidate) if depth < _MAX_LINKS else None
        except OSError:
            target = None  # not a symlink (or not there): taken as it is
        if target is None:
            resolved = candidate
            continue
        links.add((resolved, part))
        resolved = _resolve(os.path.join(resolved, target), links, depth + 1)
    return resolved
