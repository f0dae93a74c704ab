"""Reading a file the broker must not trust to be one: never block, never read without end.

A FIFO in place of a file would block ``open()`` until a writer appears, a device such as
``/dev/zero`` never ends, and a symlink in the state directory can point anywhere. Every
read here opens with ``O_NONBLOCK`` (and ``O_NOFOLLOW`` unless links are allowed), requires
a regular file, and refuses one larger than a cap before reading it.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from broker.core.errors import BrokerError

__all__ = ["UnsafeFile", "read_regular"]


class UnsafeFile(BrokerError):
    """The path is not a regular file of acceptable size (the message says what it is)."""


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "not a regular file"


def read_regular(path: Path, limit: int, *, follow: bool = False) -> tuple[bytes, int]:
    """``(content, st_mode)`` of ``path``, a regular file of at most ``limit`` bytes.

    ``FileNotFoundError`` (and other ``OSError``) propagate; anything that is not a regular
    file (a FIFO, a device, with ``follow=False`` a symlink) or is larger than ``limit``
    raises :class:`UnsafeFile`.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
    if not follow:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow:
            raise UnsafeFile(f"{path} is a symlink (not followed in the state directory)") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFile(f"{path} is {_kind(st.st_mode)}, not a regular file")
        if st.st_size > limit:
            raise UnsafeFile(f"{path} is {st.st_size} bytes, more than the {limit} accepted")
        chunks: list[bytes] = []
        size = 0
        # Read to the end (it may have grown since fstat), but never past the cap.
        while chunk := os.read(fd, min(1 << 20, limit + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise UnsafeFile(f"{path} is more than the {limit} bytes accepted")
        return b"".join(chunks), st.st_mode
    finally:
        os.close(fd)
