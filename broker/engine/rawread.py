"""The system calls of reading one credential file, and nothing else (standard library only).

:func:`raw_read` is what :func:`broker.engine.reader.read_file` does to the file; what its
outcome means (a problem, a fault, a read) is decided there. The outcome is a plain tuple
so that the start-up read worker (:mod:`broker.engine.read_worker`, another process) can
make the same calls and send the outcome back as it is.
"""

from __future__ import annotations

import errno
import os
import stat

__all__ = [
    "CHANGED",
    "OPEN_FAILED",
    "READ",
    "READ_ATTEMPTS",
    "READ_FAILED",
    "RawRead",
    "StatFields",
    "raw_read",
    "signature_of",
]

_OPEN_FLAGS = os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC | os.O_NONBLOCK
#: Reads of a file that a writer changed while it was read (its fstat differs before and
#: after), before giving up on it for now.
READ_ATTEMPTS = 8

#: ``(OPEN_FAILED, errno, is a dangling symlink)``
OPEN_FAILED = 0
#: ``(READ_FAILED, errno)``: opened, then fstat or pread failed
READ_FAILED = 1
#: ``(CHANGED,)``: it changed during each of READ_ATTEMPTS reads
CHANGED = 2
#: ``(READ, is a symlink, StatFields, content)``; content is ``None`` when the file was not
#: to be read (not a regular file, or larger than the cap by its fstat)
READ = 3

#: (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns, st_mode, st_mtime) of the descriptor.
StatFields = tuple[int, int, int, int, int, int, float]
RawRead = tuple[int, int, bool] | tuple[int, int] | tuple[int] | tuple[
    int, bool, StatFields, bytes | None
]


def signature_of(st: os.stat_result) -> tuple[int, int, int, int, int, int]:
    """A file's signature: any difference in it means "read it again"."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode)


def raw_read(path: str, max_size: int) -> RawRead:
    """Open ``path`` and read it whole (never more than ``max_size + 1`` bytes), fstat'ed
    before and after: a read they disagree about (a writer was at work) is repeated."""
    try:
        fd, is_symlink = _open(path)
    except OSError as exc:
        code = exc.errno or 0
        return (OPEN_FAILED, code, code == errno.ENOENT and os.path.islink(path))
    try:
        for _ in range(READ_ATTEMPTS):
            st = os.fstat(fd)
            fields = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                      st.st_mode, st.st_mtime)
            if not stat.S_ISREG(st.st_mode) or st.st_size > max_size:
                return (READ, is_symlink, fields, None)
            # One byte past the cap tells a file that grew since fstat from one that fits.
            content = _read_at_most(fd, max_size + 1, first=st.st_size + 1)
            if signature_of(os.fstat(fd)) == fields[:6]:
                return (READ, is_symlink, fields, content)
        return (CHANGED,)
    except OSError as exc:
        return (READ_FAILED, exc.errno or 0)
    finally:
        os.close(fd)


def _open(path: str) -> tuple[int, bool]:
    """``path`` opened for reading, and whether its last component is a symlink.

    Opened without following a symlink first: a plain file (nearly every read) then costs
    one call where ``lstat`` and ``open`` took two. Refused as a symlink, it is opened
    again, followed.
    """
    try:
        return os.open(path, _OPEN_FLAGS | os.O_NOFOLLOW), False
    except OSError as exc:
        if exc.errno not in _NOT_FOLLOWED:
            raise
    return os.open(path, _OPEN_FLAGS), True


#: What ``open`` with ``O_NOFOLLOW`` says of a symlink (Linux: ELOOP; some BSDs: EMLINK).
_NOT_FOLLOWED = frozenset({errno.ELOOP, errno.EMLINK})


def _read_at_most(fd: int, limit: int, *, first: int) -> bytes:
    """Up to ``limit`` bytes from the start of the file (pread: a retry starts over).

    The first read asks for ``first`` bytes (the size fstat gave, plus one): a buffer the
    size of the file, not of the cap, for every read. When it ends exactly where fstat said
    the file does, that is the end, found without a second call. A file larger than its
    fstat size (grown since: it fills the extra byte; or a size that is no byte count) is
    read on in 1 MiB chunks; the fstat after the read catches any other change.
    """
    wanted = min(limit, max(1, first))
    chunk = os.pread(fd, wanted, 0)
    if len(chunk) == first - 1 < wanted or not chunk:
        return chunk
    chunks = [chunk]
    offset = len(chunk)
    while offset < limit:
        chunk = os.pread(fd, min(limit - offset, 1 << 20), offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)
