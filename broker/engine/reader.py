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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from broker.config import CredentialSettings
from broker.core.globs import glob_matches, is_glob
from broker.core.problems import ProblemCode
from broker.core.reads import FileRead, FileSignature, GlobSignature, Signature
from broker.core.state import FileInfo, Problem
from broker.engine.rawread import (
    CHANGED,
    OPEN_FAILED,
    READ,
    READ_ATTEMPTS,
    RawRead,
    StatFields,
    raw_read,
    signature_of,
)

__all__ = [
    "RESOURCE_ERRNOS",
    "CredentialRead",
    "FileRead",
    "FileReader",
    "FileSignature",
    "GlobSignature",
    "Signature",
    "file_read",
    "glob_paths",
    "read_credential",
    "read_file",
    "read_files",
    "signature_of",
    "stat_signature",
]

#: Errors that say the broker ran out of something (descriptors, memory), nothing about the
#: file: such a read is a broker fault, retried, never a credential's state.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


#: Reads one file: ``(role, path, max_size) -> FileRead`` (:func:`read_file`).
FileReader = Callable[[str, str, int], FileRead]


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


def read_credential(spec: CredentialSettings, read: FileReader | None = None) -> CredentialRead:
    """Read every file of ``spec`` now, never raising.

    With a ``fallback``: when the expiry file is absent and the fallback's expiry file exists,
    the fallback's files are read and used instead (its settings in ``spec`` of the result).
    ``read`` reads one file (:func:`read_file`; start-up passes what its read worker read).
    """
    reads, signatures = read_files(spec.files, spec.max_size, read)
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
    files: Mapping[str, Path], max_size: int, read_one: FileReader | None = None
) -> tuple[tuple[FileRead, ...], dict[str, Signature | None]]:
    """Read each role's file (every match of a pattern role), with each path's signature."""
    read_one = read_one or read_file
    reads: list[FileRead] = []
    signatures: dict[str, Signature | None] = {}
    for role, path in files.items():
        text = str(path)
        if not is_glob(text):
            read = read_one(role, text, max_size)
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
            reads.append(FileRead(info, fault=_fault(text, exc.errno or 0)))
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
    return file_read(role, path, max_size, raw_read(path, max_size))


def file_read(role: str, path: str, max_size: int, raw: RawRead) -> FileRead:
    """What :func:`~broker.engine.rawread.raw_read` of ``path`` found, as a :class:`FileRead`
    (the system calls made here, or by the start-up read worker)."""
    missing = FileInfo(role=role, path=path, present=False)
    kind = raw[0]
    if kind == READ:
        _, is_symlink, fields, content = raw  # type: ignore[misc]
        return _found(role, path, max_size, is_symlink, fields, content)
    if kind == CHANGED:
        return FileRead(missing, fault=f"{path} changed during each of {READ_ATTEMPTS} reads")
    code = raw[1]  # type: ignore[misc]
    if code in RESOURCE_ERRNOS:
        return FileRead(missing, fault=_fault(path, code))
    if kind == OPEN_FAILED:
        if code == errno.ENOENT:
            what = "is a symlink to nothing" if raw[2] else "does not exist"  # type: ignore[misc]
            return FileRead(
                missing, problem=Problem(ProblemCode.FILE_MISSING, f"{role} file {path} {what}")
            )
        if code in (errno.EACCES, errno.EPERM):
            return FileRead(
                missing,
                problem=Problem(ProblemCode.FILE_UNREADABLE, f"permission denied reading {path}"),
            )
    return FileRead(missing, problem=_open_problem(role, path, code))


def _found(
    role: str, path: str, max_size: int, is_symlink: bool, fields: StatFields,
    content: bytes | None,
) -> FileRead:
    size, mode = fields[2], fields[5]
    info = FileInfo(
        role=role, path=path, present=True, size=size, mtime=fields[6], mode=stat.S_IMODE(mode)
    )
    sig = fields[:6]
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        return FileRead(
            info,
            sig,
            problem=Problem(ProblemCode.NOT_A_FILE, f"{path} is {kind}"),
            is_symlink=is_symlink,
        )
    if content is None or size > max_size:
        return FileRead(info, sig, problem=_too_large(path, size, max_size))
    if len(content) > max_size:
        return FileRead(info, sig, problem=_too_large(path, len(content), max_size))
    if len(content) != size:
        # A filesystem whose sizes are not byte counts (some FUSE and pseudo files): the
        # size published is that of the bytes fingerprinted.
        info = replace(info, size=len(content))
    return FileRead(info, sig, content=content, is_symlink=is_symlink)


def _fault(path: str, code: int) -> str:
    return f"cannot read {path} now: {os.strerror(code)}"


def _too_large(path: str, size: int, max_size: int) -> Problem:
    return Problem(
        ProblemCode.TOO_LARGE,
        f"{path} is {size} bytes, larger than max_size ({max_size} bytes)",
    )


def _open_problem(role: str, path: str, code: int) -> Problem:
    if code == errno.ELOOP:
        return Problem(ProblemCode.SYMLINK_LOOP, f"{path} is a symlink loop")
    if code == errno.ENOTDIR:
        return Problem(
            ProblemCode.FILE_MISSING,
            f"{role} file {path} does not exist (a parent is not a directory)",
        )
    if code in (errno.EACCES, errno.EPERM):
        return Problem(ProblemCode.FILE_UNREADABLE, f"permission denied reading {path}")
    if code == errno.ENXIO:
        return Problem(ProblemCode.NOT_A_FILE, f"{path} is not a regular file")
    return Problem(
        ProblemCode.FILE_UNREADABLE, f"cannot read {path}: {os.strerror(code)}"
    )
