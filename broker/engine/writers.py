"""Who holds a file open for writing right now (Linux ``/proc``).

inotify's close-write tells the watcher when a writer is done, but a file found by a scan
(start-up, a directory that just appeared, a resync) comes with no such event. Before
publishing what a scan found, the engine asks here whether a writer still holds the file,
and if so waits for its close instead of publishing half a file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

_ACCESS_MODE = 0o3  # O_ACCMODE
_WRITE_MODES = (os.O_WRONLY, os.O_RDWR)


def stat_all(paths: Iterable[str]) -> dict[str, os.stat_result | None]:
    """``os.stat`` of each path (``None``: not there, or not to be stat'ed)."""
    stats: dict[str, os.stat_result | None] = {}
    for path in paths:
        try:
            stats[path] = os.stat(path)
        except (OSError, ValueError):
            stats[path] = None
    return stats


def open_for_writing(
    paths: Iterable[str], stats: Mapping[str, os.stat_result | None] | None = None
) -> set[str]:
    """The subset of ``paths`` some visible process has open for writing.

    Without root only this user's processes are visible, which covers the usual case of a
    CLI writing a token into its user's home. Costs one stat per open file descriptor on
    the machine, so it is only used for scan results, never on the inotify event path.
    ``stats`` (:func:`stat_all` of the paths, taken by the caller just now) saves stat'ing
    them again.
    """
    if stats is None:
        stats = stat_all(paths)
    inodes: dict[tuple[int, int], list[str]] = {}
    for path, st in stats.items():
        if st is not None:
            inodes.setdefault((st.st_dev, st.st_ino), []).append(path)
    if not inodes:
        return set()
    found: set[str] = set()
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return found
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(f"{fd_dir}/{fd}")
            except OSError:
                continue
            key = (st.st_dev, st.st_ino)
            if key in inodes and _is_write_mode(f"/proc/{pid}/fdinfo/{fd}"):
                found.update(inodes[key])
    return found


def _is_write_mode(fdinfo: str) -> bool:
    try:
        with open(fdinfo) as fh:
            for line in fh:
                if line.startswith("flags:"):
                    return (int(line.split()[1], 8) & _ACCESS_MODE) in _WRITE_MODES
    except (OSError, ValueError, IndexError):
        return False
    return False
