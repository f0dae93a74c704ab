"""A raw inotify descriptor: add and remove watches, read batches of undecoded events.

The watcher filters events by name before doing anything else with them, so that a
directory full of unrelated activity costs next to nothing. A general-purpose binding
builds a ``Path``, an ``IntFlag`` and an object per event before the caller can look at
the name; here an event is four integers and the name's bytes, straight from the buffer.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from types import TracebackType

import anyio

#: struct inotify_event: wd, mask, cookie, len; then ``len`` bytes of NUL-padded name.
HEADER = struct.Struct("iIII")
_IN_CLOEXEC = os.O_CLOEXEC
_IN_NONBLOCK = os.O_NONBLOCK
#: Room for many events per read(2): a flood is taken in few system calls.
_READ_SIZE = 256 * 1024


class Inotify:
    """One inotify instance. Use as a context manager; read with :meth:`read`."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        fd = self._libc.inotify_init1(_IN_CLOEXEC | _IN_NONBLOCK)
        if fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        self.fd: int | None = fd

    def __enter__(self) -> Inotify:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def add_watch(self, path: str, mask: int) -> int:
        """Watch ``path`` (following symlinks); the watch descriptor. ``OSError`` on failure."""
        wd = int(self._libc.inotify_add_watch(self._fileno(), os.fsencode(path), mask))
        if wd < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), path)
        return wd

    def rm_watch(self, wd: int) -> None:
        """Stop a watch; ``OSError`` (EINVAL) when the kernel has already dropped it."""
        if self._libc.inotify_rm_watch(self._fileno(), wd) < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))

    async def read(self) -> bytes:
        """Wait for events and return those queued, as the kernel wrote them (see HEADER)."""
        fd = self._fileno()
        while True:
            try:
                return os.read(fd, _READ_SIZE)
            except BlockingIOError:
                await anyio.wait_readable(fd)
            except InterruptedError:
                continue

    def _fileno(self) -> int:
        if self.fd is None:
            raise OSError(errno.EBADF, "inotify instance is closed")
        return self.fd
