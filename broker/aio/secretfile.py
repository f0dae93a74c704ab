"""Reading a small file that may hold a secret (or decide what the broker runs): the one way.

The config file, ``http.token_file``, ``mqtt.password_file`` and a webhook's ``secret_file``
are all read the same careful way: opened non-blocking (a FIFO put in the file's place must
not hang a start or a reload), a regular file only, with a bounded read (``-c /dev/zero``
must not eat memory), and its mode bits refused before anything is read when the caller
says which must be clear. Each caller then says in its own words what went wrong, from
:attr:`SecretFileError.reason`; no message here ever holds the content.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import anyio.to_thread

from broker.core.errors import BrokerError

__all__ = ["Reason", "SecretFile", "SecretFileError", "load_secret_file", "read_secret_file"]

Reason = Literal[
    "missing", "directory", "not-regular", "permissions", "denied", "unreadable", "too-large"
]

_MESSAGES: dict[Reason, str] = {
    "missing": "not found",
    "directory": "is a directory",
    "not-regular": "is not a regular file (a FIFO, device or socket)",
    "permissions": "is open to other users",
    "denied": "cannot be read: permission denied",
    "unreadable": "cannot be read",
    "too-large": "is too large",
}


class SecretFileError(BrokerError):
    """The file cannot be used: ``reason`` says why, ``detail`` adds the OS's words."""

    def __init__(self, path: Path, reason: Reason, *, mode: int = 0, detail: str = "") -> None:
        # All of it to Exception, so the error pickles and copies faithfully.
        super().__init__(path, reason, mode, detail)
        self.path = path
        self.reason: Reason = reason
        self.mode = mode  # the file's st_mode when it was opened, else 0
        self.detail = detail  # strerror for "unreadable" ("" when there is none)

    def __str__(self) -> str:
        text = f"{self.path} {_MESSAGES[self.reason]}"
        return f"{text}: {self.detail}" if self.detail else text


@dataclass(frozen=True, slots=True)
class SecretFile:
    """What was read: the bytes as they are (not stripped), and the file's mode."""

    data: bytes
    mode: int

    @property
    def shared(self) -> bool:
        """Whether group or others may read or write the file."""
        return bool(self.mode & 0o077)


def read_secret_file(
    path: str | os.PathLike[str], *, limit: int = 64 * 1024, refuse_mode: int = 0
) -> SecretFile:
    """Read the regular file at ``path``, at most ``limit`` bytes. Blocking.

    ``refuse_mode``: permission bits (e.g. ``0o077``, or ``0o002`` for "writable by others")
    that make the file refused, checked before it is read. Raises :class:`SecretFileError`.
    """
    where = Path(path)
    try:
        fd = os.open(where, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SecretFileError(where, "missing") from None
    except IsADirectoryError:
        raise SecretFileError(where, "directory") from None
    except PermissionError:
        raise SecretFileError(where, "denied") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        raise SecretFileError(where, "unreadable", detail=getattr(exc, "strerror", "") or "") \
            from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise SecretFileError(where, "directory", mode=mode)
        if not stat.S_ISREG(mode):
            raise SecretFileError(where, "not-regular", mode=mode)
        if mode & refuse_mode:
            raise SecretFileError(where, "permissions", mode=mode)
        with os.fdopen(fd, "rb") as handle:
            fd = -1  # the file object owns it now
            data = handle.read(limit + 1)
    except OSError as exc:
        raise SecretFileError(where, "unreadable", detail=exc.strerror or "") from None
    finally:
        if fd >= 0:
            os.close(fd)
    if len(data) > limit:
        raise SecretFileError(where, "too-large", mode=mode)
    return SecretFile(data, mode)


async def load_secret_file(
    path: str | os.PathLike[str], *, limit: int = 64 * 1024, refuse_mode: int = 0
) -> SecretFile:
    """:func:`read_secret_file` in a worker thread, for the event loop's callers."""
    return await anyio.to_thread.run_sync(
        lambda: read_secret_file(path, limit=limit, refuse_mode=refuse_mode)
    )
