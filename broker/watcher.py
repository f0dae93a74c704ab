"""inotify on the parent directories of credential files.

Never on the files themselves: a rename over a file (the usual atomic update) ends a watch
on it. Each directory holding a watched file is watched non-recursively; a directory that
does not exist yet is awaited by watching its nearest existing ancestor. A file that is a
symlink (the Kubernetes ``..data`` pattern) also has its link directory and the directory
of its target watched.

The watcher only says "these paths may have changed". Whether they did is decided by
content hash in the engine. What the watcher adds is *when* to look: after a writer
closes the file (close-write) or a new version is moved in, never in the middle of a
write. ``writing`` tells the engine which files a writer has modified and not yet closed.

A path whose last component is a pattern (``~/.aws/sso/cache/*.json``) stands for every file
matching it: its directory is watched, and any such event on a matching name (one created,
closed after writing, moved in, deleted or moved away) is reported as a change of the
pattern itself, the path the engine knows.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from types import TracebackType

from asyncinotify import Event as InotifyEvent
from asyncinotify import Inotify, Mask, Watch

from broker.config import glob_matches, is_glob

log = logging.getLogger("broker.watcher")

_DIR_MASK = (
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
_GONE = Mask.IGNORED | Mask.DELETE_SELF | Mask.MOVE_SELF
_NAME_CHANGES = Mask.CREATE | Mask.MOVED_TO | Mask.DELETE | Mask.MOVED_FROM

#: ``notify(paths, scan)``: ``scan`` is True when the paths were found by looking (a new
#: directory, a queue overflow) rather than by a writer's close, so a writer may still be
#: busy with them.
Notify = Callable[[set[str], bool], None]


class _Kind(Enum):
    DIRECT = "direct"  # the file's own name in its directory
    LINK = "link"  # any name change in a directory the file's symlink resolves through
    PENDING = "pending"  # the next missing path component under the nearest existing ancestor
    GLOB = "glob"  # any name matching a pattern in the file's directory


@dataclass(slots=True)
class _Dir:
    watch: Watch | None = None
    direct: dict[str, set[str]] = field(default_factory=dict)
    pending: dict[str, set[str]] = field(default_factory=dict)
    links: set[str] = field(default_factory=set)
    globs: dict[str, set[str]] = field(default_factory=dict)  # name pattern -> pattern paths

    def empty(self) -> bool:
        return not (self.direct or self.pending or self.links or self.globs)

    def named(self, name: str) -> set[str]:
        """The watched paths that ``name`` in this directory is (or matches)."""
        found = set(self.direct.get(name, ()))
        for pattern, paths in self.globs.items():
            if glob_matches(name, pattern):
                found |= paths
        return found


_Entry = tuple[str, str, _Kind]


class Watcher:
    """Watches a set of file paths and calls ``notify`` when any of them may have changed."""

    def __init__(self, notify: Notify) -> None:
        self._notify = notify
        self._inotify: Inotify | None = None
        self._plans: dict[str, frozenset[_Entry]] = {}
        self._dirs: dict[str, _Dir] = {}
        self._watch_dirs: dict[int, str] = {}
        #: Paths modified by a writer that has not closed them yet.
        self.writing: set[str] = set()
        #: Paths the kernel would not watch (limit reached, no permission): poll them.
        self.polled: set[str] = set()
        #: Watch failures and event-handling errors, for metrics.
        self.errors = 0

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
        return sum(1 for d in self._dirs.values() if d.watch is not None)

    def watch(self, paths: Iterable[str]) -> None:
        """Make ``paths`` the set of watched files (added and removed as needed)."""
        wanted = set(paths)
        for path in list(self._plans):
            if path not in wanted:
                self._apply(path, frozenset())
        for path in wanted:
            self._replan(path)

    async def run(self) -> None:
        """Read inotify events forever (cancel to stop)."""
        assert self._inotify is not None, "use the Watcher as a context manager"
        async for event in self._inotify:
            try:
                self._handle(event)
            except Exception:
                # A bug here must not stop the daemon: the resync safety net still runs.
                self.errors += 1
                log.exception("inotify event handling failed")

    # -- planning -------------------------------------------------------------------------

    def _replan(self, path: str) -> None:
        self._apply(path, _plan(path))

    def _apply(self, path: str, plan: frozenset[_Entry]) -> None:
        old = self._plans.get(path, frozenset())
        if plan == old and path not in self.polled:
            return
        for directory, name, kind in old - plan:
            entry = self._dirs.get(directory)
            if entry is None:
                continue
            if kind is _Kind.LINK:
                entry.links.discard(path)
            else:
                index = _index(entry, kind)
                index.get(name, set()).discard(path)
                if not index.get(name, True):
                    del index[name]
            if entry.empty():
                self._unwatch(directory)
        if plan:
            self._plans[path] = plan
        else:
            self._plans.pop(path, None)
            self.polled.discard(path)
            self.writing.discard(path)
            return
        polled = False
        for directory, name, kind in plan:
            entry = self._dirs.setdefault(directory, _Dir())
            if kind is _Kind.LINK:
                entry.links.add(path)
            else:
                _index(entry, kind).setdefault(name, set()).add(path)
            if entry.watch is None and not self._add_watch(directory, entry):
                polled = True
        if polled:
            self.polled.add(path)
        else:
            self.polled.discard(path)

    def _add_watch(self, directory: str, entry: _Dir) -> bool:
        assert self._inotify is not None
        try:
            entry.watch = self._inotify.add_watch(directory, _DIR_MASK)
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
        self._watch_dirs[entry.watch.wd] = directory
        return True

    def _unwatch(self, directory: str) -> None:
        entry = self._dirs.pop(directory, None)
        if entry is None or entry.watch is None or self._inotify is None:
            return
        self._watch_dirs.pop(entry.watch.wd, None)
        # The kernel may already have dropped it (directory deleted).
        with contextlib.suppress(OSError, ValueError, KeyError):
            self._inotify.rm_watch(entry.watch)

    # -- events ---------------------------------------------------------------------------

    def _handle(self, event: InotifyEvent) -> None:
        log.debug(
            "inotify",
            extra={
                "mask": repr(event.mask),
                "entry": str(event.name),
                "wd": event.watch.wd if event.watch else None,
            },
        )
        mask = event.mask
        if mask & Mask.Q_OVERFLOW:
            log.warning("inotify queue overflowed; re-reading every watched file")
            paths = set(self._plans)
            for path in paths:
                self._replan(path)
            self._notify(paths, True)
            return
        watch = event.watch
        directory = self._watch_dirs.get(watch.wd) if watch is not None else None
        if directory is None:
            return
        entry = self._dirs.get(directory)
        if entry is None:
            return
        if mask & _GONE:
            self._directory_gone(directory, entry)
            return
        name = os.fsdecode(event.name) if event.name is not None else None
        if name is None:
            return
        settled: set[str] = set()
        scanned: set[str] = set()
        # Copies: replanning edits these very sets.
        pending = set(entry.pending.get(name, ()))
        if pending and mask & (Mask.CREATE | Mask.MOVED_TO):
            for path in pending:
                self._replan(path)
            scanned |= pending
        direct = entry.named(name)
        if direct:
            if mask & Mask.MODIFY:
                self.writing |= direct
            elif mask & Mask.CREATE and not mask & Mask.ISDIR and _is_regular(directory, name):
                # A new regular file: its writer has it open; its close-write will follow.
                self.writing |= direct
            else:
                if mask & (Mask.CLOSE_WRITE | _NAME_CHANGES):
                    self.writing -= direct
                if mask & _NAME_CHANGES:
                    for path in direct:
                        if self._plan_may_change(path, mask, directory, name):
                            self._replan(path)
                settled |= direct
        if entry.links and mask & _NAME_CHANGES:
            links = set(entry.links)
            for path in links:
                self._replan(path)
            settled |= links
        if scanned:
            self._notify(scanned, True)
        if settled - scanned:
            self._notify(settled - scanned, False)

    def _plan_may_change(self, path: str, mask: Mask, directory: str, name: str) -> bool:
        # A plain file renamed over a plain file (the common rotation) keeps its plan;
        # replanning costs stats on the hot path, so only links and directories get one.
        if mask & Mask.ISDIR or any(kind is _Kind.LINK for _, _, kind in self._plans.get(path, ())):
            return True
        return bool(mask & (Mask.CREATE | Mask.MOVED_TO)) and os.path.islink(
            os.path.join(directory, name)
        )

    def _directory_gone(self, directory: str, entry: _Dir) -> None:
        # Moved away or deleted: what was watched there now lives (or not) somewhere else.
        self._unwatch(directory)
        affected: set[str] = set(entry.links)
        for group in (entry.direct, entry.pending, entry.globs):
            for paths in group.values():
                affected |= paths
        self._dirs.pop(directory, None)
        for path in affected:
            self._plans.pop(path, None)
            self._replan(path)
        if affected:
            self._notify(affected, False)


def _index(entry: _Dir, kind: _Kind) -> dict[str, set[str]]:
    if kind is _Kind.GLOB:
        return entry.globs
    return entry.direct if kind is _Kind.DIRECT else entry.pending


def _is_regular(directory: str, name: str) -> bool:
    try:
        return os.path.isfile(os.path.join(directory, name)) and not os.path.islink(
            os.path.join(directory, name)
        )
    except OSError:
        return False


def _plan(path: str) -> frozenset[_Entry]:
    """Which (directory, name) pairs to watch so that any change to ``path`` is seen."""
    parent, name = os.path.split(path)
    ancestor, child = parent, name
    while not os.path.isdir(ancestor):
        up = os.path.dirname(ancestor)
        if up == ancestor:
            return frozenset()
        ancestor, child = up, os.path.basename(ancestor)
    if ancestor != parent:
        return frozenset({(ancestor, child, _Kind.PENDING)})
    if is_glob(path):
        # Matches are taken as they are; a symlinked match's target directory is not watched.
        return frozenset({(parent, name, _Kind.GLOB)})
    entries: set[_Entry] = {(parent, name, _Kind.DIRECT)}
    if os.path.islink(path):
        entries.add((parent, "", _Kind.LINK))
        real_parent, real_name = os.path.split(os.path.realpath(path))
        if real_parent != parent and os.path.isdir(real_parent):
            entries.add((real_parent, real_name, _Kind.DIRECT))
    return frozenset(entries)
