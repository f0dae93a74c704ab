"""What one read of one credential file found: the plain data the state machine works on.

The engine's reader makes these from the disk; the machine (pure) reduces them to an
observation. Nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from broker.core.state import FileInfo, Problem

__all__ = ["FileRead", "FileSignature", "GlobSignature", "Signature"]

#: (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns, st_mode): any difference means "re-read".
FileSignature = tuple[int, int, int, int, int, int]
#: A pattern's: (name, signature) of every matching file, sorted by name.
GlobSignature = tuple[tuple[str, FileSignature], ...]
Signature = FileSignature | GlobSignature


@dataclass(frozen=True, slots=True)
class FileRead:
    """What one read of one file found. ``content`` is held only until it is fingerprinted."""

    info: FileInfo
    signature: FileSignature | None = None
    content: bytes | None = field(default=None, repr=False)
    problem: Problem | None = None
    is_symlink: bool = False
    #: Why this read says nothing about the credential (out of descriptors, a writer
    #: changing the file throughout): the reader of the result retries later.
    fault: str | None = None
