"""Reading credential files from disk into snapshots: the only place content bytes enter."""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field

from broker.state import FileInfo, Problem

# (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns, st_mode): any difference means "re-read".
Signature = tuple[int, int, int, int, int, int]

_OPEN_FLAGS = os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC | os.O_NONBLOCK


@dataclass(frozen=True, slots=True)
class FileRead:
    """What one read of one file found. ``content`` is held only until it is fingerprinted."""

    info: FileInfo
    signature: Signature | None = None
    content: bytes | None = field(default=None, repr=False)
    problem: Problem | None = None
    is_symlink: bool = False


def signature_of(st: os.stat_result) -> Signature:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode)


def stat_signature(path: str) -> Signature | None:
    """The cheap resync probe: a signature, or ``None`` when the path is not readable as a file."""
    try:
        return signature_of(os.stat(path))
    except (OSError, ValueError):
        return None


def read_file(role: str, path: str, max_size: int) -> FileRead:
    """Read one credential file, never more than ``max_size`` bytes, never raising."""
    missing = FileInfo(role=role, path=path, present=False)
    try:
        is_symlink = os.path.islink(path)
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        problem = Problem("file-missing", f"{role} file {path} does not exist")
        if os.path.islink(path):
            problem = Problem("file-missing", f"{role} file {path} is a symlink to nothing")
        return FileRead(missing, problem=problem)
    except PermissionError:
        return FileRead(
            missing, problem=Problem("file-unreadable", f"permission denied reading {path}")
        )
    except OSError as exc:
        return FileRead(missing, problem=_open_problem(role, path, exc))
    try:
        st = os.fstat(fd)
        info = FileInfo(
            role=role,
            path=path,
            present=True,
            size=st.st_size,
            mtime=st.st_mtime,
            mode=stat.S_IMODE(st.st_mode),
        )
        sig = signature_of(st)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            return FileRead(
                info, sig, problem=Problem("not-a-file", f"{path} is {kind}"), is_symlink=is_symlink
            )
        if st.st_size > max_size:
            return FileRead(info, sig, problem=_too_large(path, st.st_size, max_size))
        # One byte past the cap tells a file that grew since fstat from one that fits.
        content = _read_at_most(fd, max_size + 1)
        if len(content) > max_size:
            return FileRead(info, sig, problem=_too_large(path, len(content), max_size))
        return FileRead(info, sig, content=content, is_symlink=is_symlink)
    except OSError as exc:
        return FileRead(missing, problem=_open_problem(role, path, exc))
    finally:
        os.close(fd)


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    remaining = limit
    while remaining > 0:
        chunk = os.read(fd, min(remaining, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _too_large(path: str, size: int, max_size: int) -> Problem:
    return Problem("too-large", f"{path} is {size} bytes, larger than max_size ({max_size} bytes)")


def _open_problem(role: str, path: str, exc: OSError) -> Problem:
    if exc.errno == errno.ELOOP:
        return Problem("symlink-loop", f"{path} is a symlink loop")
    if exc.errno == errno.ENOTDIR:
        return Problem(
            "file-missing", f"{role} file {path} does not exist (a parent is not a directory)"
        )
    if exc.errno in (errno.EACCES, errno.EPERM):
        return Problem("file-unreadable", f"permission denied reading {path}")
    if exc.errno == errno.ENXIO:
        return Problem("not-a-file", f"{path} is not a regular file")
    return Problem("file-unreadable", f"cannot read {path}: {os.strerror(exc.errno or 0)}")
