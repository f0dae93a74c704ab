"""Reading credential files from disk into snapshots: the only place content bytes enter.

:func:`read_credential` reads everything one credential needs: each role's file, each file
matching a pattern role (``~/.aws/sso/cache/*.json``), and the fallback's files instead when
the expiry file is absent. :func:`stat_signature` is the cheap probe the resync compares
against what the last read saw.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from broker.config import CredentialSettings
from broker.core.globs import glob_matches, is_glob
from broker.core.problems import ProblemCode
from broker.core.reads import FileRead, FileSignature, GlobSignature, Signature
from broker.core.state import FileInfo, Problem

__all__ = [
    "RESOURCE_ERRNOS",
    "CredentialRead",
    "FileRead",
    "FileSignature",
    "GlobSignature",
    "Signature",
    "glob_paths",
    "read_credential",
    "read_file",
    "read_files",
    "signature_of",
    "stat_signature",
]

_OPEN_FLAGS = os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC | os.O_NONBLOCK

#: Errors that say the broker ran out of something (descriptors, memory), nothing about the
#: file: such a read is a broker fault, retried, never a credential's state.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
#: Reads of a file that a writer changed while it was read (its fstat differs before and
#: after), before giving up on it for now.
READ_ATTEMPTS = 8


@dataclass(frozen=True, slots=True)
class CredentialRead:
    """One read of everything a credential needs."""

    #: The settings ``reads`` answer to: the credential's own, or ``with_fallback_files()``
    #: when its fallback is in use.
    spec: CredentialSettings
    #: One per role, in role order; a pattern role has one per matching file, sorted by path
    #: (or a single ``present: false`` entry at the pattern when nothing matches).
    reads: tuple[FileRead, ...]
    #: Every watched path (patterns as such) -> what :func:`stat_signature` gave for it when
    #: it was read, for the resync to compare against.
    signatures: Mapping[str, Signature | None]
    #: Why the fallback is in use (for the state's ``reason``); ``None`` when it is not.
    note: str | None = None

    @property
    def fault(self) -> str | None:
        """The first read's :attr:`FileRead.fault`: then nothing here is to be published."""
        return next((r.fault for r in self.reads if r.fault is not None), None)


def signature_of(st: os.stat_result) -> FileSignature:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode)


def stat_signature(path: str) -> Signature | None:
    """The cheap resync probe: a signature, or ``None`` when the path is not readable as a file.

    For a pattern: the sorted (name, signature) of every matching file, ``None`` when none
    matches; a file appearing, vanishing or changing changes it.
    """
    if is_glob(path):
        matches = tuple(
            (os.path.basename(match), signature)
            for match in glob_paths(path)
            if (signature := _file_signature(match)) is not None
        )
        return matches or None
    return _file_signature(path)


def _file_signature(path: str) -> FileSignature | None:
    try:
        return signature_of(os.stat(path))
    except (OSError, ValueError):
        return None


def glob_paths(pattern: str) -> list[str]:
    """The paths matching ``pattern`` (a pattern in its last component only), sorted."""
    try:
        return _glob(pattern)
    except OSError:
        return []


def _glob(pattern: str) -> list[str]:
    """:func:`glob_paths`, raising the broker's own faults (``RESOURCE_ERRNOS``)."""
    directory, name_pattern = os.path.split(pattern)
    try:
        names = os.listdir(directory or ".")
    except OSError as exc:
        if exc.errno in RESOURCE_ERRNOS:
            raise
        return []
    except ValueError:
        return []
    return sorted(os.path.join(directory, n) for n in names if glob_matches(n, name_pattern))


def read_credential(spec: CredentialSettings) -> CredentialRead:
    """Read every file of ``spec`` now, never raising.

    With a ``fallback``: when the expiry file is absent and the fallback's expiry file exists,
    the fallback's files are read and used instead (its settings in ``spec`` of the result).
    """
    reads, signatures = read_files(spec.files, spec.max_size)
    alternative = spec.with_fallback_files()
    if alternative is None:
        return CredentialRead(spec, reads, signatures)
    unused = [str(p) for p in alternative.files.values() if str(p) not in signatures]
    if _absent(reads, spec.expiry_file):
        alt_reads, alt_signatures = read_files(alternative.files, alternative.max_size)
        if not _absent(alt_reads, alternative.expiry_file):
            for path in (str(p) for p in spec.files.values()):
                alt_signatures.setdefault(path, signatures[path])
            primary = spec.files[spec.expiry_file]
            used = alternative.files[alternative.expiry_file]
            note = (
                f"{spec.expiry_file} file {primary} is absent; using the fallback "
                f"{alternative.expiry_file} file {used}"
            )
            return CredentialRead(alternative, alt_reads, alt_signatures, note)
        signatures.update((p, alt_signatures[p]) for p in unused)
        return CredentialRead(spec, reads, signatures)
    signatures.update((p, stat_signature(p)) for p in unused)
    return CredentialRead(spec, reads, signatures)


def read_files(
    files: Mapping[str, Path], max_size: int
) -> tuple[tuple[FileRead, ...], dict[str, Signature | None]]:
    """Read each role's file (every match of a pattern role), with each path's signature."""
    reads: list[FileRead] = []
    signatures: dict[str, Signature | None] = {}
    for role, path in files.items():
        text = str(path)
        if not is_glob(text):
            read = read_file(role, text, max_size)
            reads.append(read)
            signatures[text] = read.signature
            continue
        # Probe first: a change between the probe and the reads makes the next resync look
        # again, never the other way round.
        signatures[text] = stat_signature(text)
        try:
            matches = _glob(text)
        except OSError as exc:
            info = FileInfo(role=role, path=text, present=False)
            reads.append(FileRead(info, fault=_fault(text, exc)))
            continue
        found = [read_file(role, match, max_size) for match in matches]
        # A file that vanished between listing and opening is simply no longer in the set.
        found = [r for r in found if not (r.problem and r.problem.code == ProblemCode.FILE_MISSING)]
        if not found:
            missing = FileInfo(role=role, path=text, present=False)
            problem = Problem(ProblemCode.FILE_MISSING, f"no {role} file matches {text}")
            found = [FileRead(missing, problem=problem)]
        reads.extend(found)
    return tuple(reads), signatures


def _absent(reads: tuple[FileRead, ...], role: str) -> bool:
    """Every read of ``role`` found no file there (absent, not merely unreadable)."""
    mine = [r for r in reads if r.info.role == role]
    return bool(mine) and all(
        r.problem is not None and r.problem.code == ProblemCode.FILE_MISSING for r in mine
    )


def read_file(role: str, path: str, max_size: int) -> FileRead:
    """Read one credential file, never more than ``max_size`` bytes, never raising.

    Its ``info`` (size, mtime, mode) comes from ``fstat`` on the descriptor the content was
    read from, taken before and after the read: a read they disagree about (a writer was at
    work) is repeated, up to READ_ATTEMPTS times, so the published metadata always
    describes the fingerprinted bytes.
    """
    missing = FileInfo(role=role, path=path, present=False)
    try:
        fd, is_symlink = _open(path)
    except FileNotFoundError:
        problem = Problem(ProblemCode.FILE_MISSING, f"{role} file {path} does not exist")
        if os.path.islink(path):
            problem = Problem(
                ProblemCode.FILE_MISSING, f"{role} file {path} is a symlink to nothing"
            )
        return FileRead(missing, problem=problem)
    except PermissionError:
        return FileRead(
            missing,
            problem=Problem(ProblemCode.FILE_UNREADABLE, f"permission denied reading {path}"),
        )
    except OSError as exc:
        if exc.errno in RESOURCE_ERRNOS:
            return FileRead(missing, fault=_fault(path, exc))
        return FileRead(missing, problem=_open_problem(role, path, exc))
    try:
        for _ in range(READ_ATTEMPTS):
            read = _read_open(fd, role, path, max_size, is_symlink)
            if read is not None:
                return read
        return FileRead(missing, fault=f"{path} changed during each of {READ_ATTEMPTS} reads")
    except OSError as exc:
        if exc.errno in RESOURCE_ERRNOS:
            return FileRead(missing, fault=_fault(path, exc))
        return FileRead(missing, problem=_open_problem(role, path, exc))
    finally:
        os.close(fd)


def _open(path: str) -> tuple[int, bool]:
    """``path`` opened for reading, and whether its last component is a symlink.

    Opened without following a symlink first: a plain file (nearly every read) then costs
    one call where ``lstat`` and ``open`` took two, and each call a worker thread makes
    waits for the interpreter lock while the event loop runs (at start-up, the read of a
    pass took four times its own time). Refused as a symlink, it is opened again, followed.
    """
    try:
        return os.open(path, _OPEN_FLAGS | os.O_NOFOLLOW), False
    except OSError as exc:
        if exc.errno not in _NOT_FOLLOWED:
            raise
    return os.open(path, _OPEN_FLAGS), True


#: What ``open`` with ``O_NOFOLLOW`` says of a symlink (Linux: ELOOP; some BSDs: EMLINK).
_NOT_FOLLOWED = frozenset({errno.ELOOP, errno.EMLINK})


def _read_open(fd: int, role: str, path: str, max_size: int, is_symlink: bool) -> FileRead | None:
    """One read of an open file, or ``None`` if it changed while it was read."""
    st = os.fstat(fd)
    info = _info(role, path, st)
    sig = signature_of(st)
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        return FileRead(
            info,
            sig,
            problem=Problem(ProblemCode.NOT_A_FILE, f"{path} is {kind}"),
            is_symlink=is_symlink,
        )
    if st.st_size > max_size:
        return FileRead(info, sig, problem=_too_large(path, st.st_size, max_size))
    # One byte past the cap tells a file that grew since fstat from one that fits.
    content = _read_at_most(fd, max_size + 1, first=st.st_size + 1)
    if signature_of(os.fstat(fd)) != sig:
        return None
    if len(content) > max_size:
        return FileRead(info, sig, problem=_too_large(path, len(content), max_size))
    if len(content) != st.st_size:
        # A filesystem whose sizes are not byte counts (some FUSE and pseudo files): the
        # size published is that of the bytes fingerprinted.
        info = replace(info, size=len(content))
    return FileRead(info, sig, content=content, is_symlink=is_symlink)


def _info(role: str, path: str, st: os.stat_result) -> FileInfo:
    return FileInfo(
        role=role,
        path=path,
        present=True,
        size=st.st_size,
        mtime=st.st_mtime,
        mode=stat.S_IMODE(st.st_mode),
    )


def _fault(path: str, exc: OSError) -> str:
    return f"cannot read {path} now: {os.strerror(exc.errno or 0)}"


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


def _too_large(path: str, size: int, max_size: int) -> Problem:
    return Problem(
        ProblemCode.TOO_LARGE,
        f"{path} is {size} bytes, larger than max_size ({max_size} bytes)",
    )


def _open_problem(role: str, path: str, exc: OSError) -> Problem:
    if exc.errno == errno.ELOOP:
        return Problem(ProblemCode.SYMLINK_LOOP, f"{path} is a symlink loop")
    if exc.errno == errno.ENOTDIR:
        return Problem(
            ProblemCode.FILE_MISSING,
            f"{role} file {path} does not exist (a parent is not a directory)",
        )
    if exc.errno in (errno.EACCES, errno.EPERM):
        return Problem(ProblemCode.FILE_UNREADABLE, f"permission denied reading {path}")
    if exc.errno == errno.ENXIO:
        return Problem(ProblemCode.NOT_A_FILE, f"{path} is not a regular file")
    return Problem(
        ProblemCode.FILE_UNREADABLE, f"cannot read {path}: {os.strerror(exc.errno or 0)}"
    )
