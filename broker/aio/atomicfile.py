"""One atomic file write: temp file beside the target, fsync, rename, fsync the directory.

The state store, the webhook outbox, the outcome files, the consumer table and the refresh
command's output all replace a file this way, so a crash leaves the old or the new content,
never a torn one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

__all__ = ["atomic_write"]


def atomic_write(
    path: Path,
    data: bytes | Iterable[bytes],
    *,
    follow_symlink: bool = False,
    strict_dir_sync: bool = True,
) -> None:
    """Replace ``path`` with ``data`` (mode 0600): bytes, or chunks of them written in turn
    (a large document need never be in memory whole).

    ``follow_symlink``: a symlink at ``path`` is written through (like ``cmd > path``), so
    the link stays; otherwise the link itself is replaced. ``strict_dir_sync``: a directory
    that cannot be opened or synced raises; off for directories the broker does not own
    (a user's credential directory may be write-only to us).
    """
    target = Path(os.path.realpath(path)) if follow_symlink and path.is_symlink() else path
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o600)
            if isinstance(data, bytes | bytearray | memoryview):
                fh.write(data)
            else:
                for chunk in data:
                    fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        # A full or failing disk: leave no half-written copy behind to hold the space.
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    try:
        dir_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        if strict_dir_sync:
            raise
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        if strict_dir_sync:
            raise
    finally:
        os.close(dir_fd)
