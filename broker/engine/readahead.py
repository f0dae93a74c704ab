"""Start-up's reads ahead of the event loop, by the read worker process when it can.

:class:`ReadWorker` drives :mod:`broker.engine.read_worker` (the protocol is described
there). :func:`plan_pass` splits a start-up pass into what the worker reads (credentials
whose files are all plain paths) and what a worker thread reads as before (a pattern role,
a fallback: their listings and probes stay in the reader, and they are rare);
:meth:`PassPlan.reads` turns the worker's answer into the reads and the writer look a
thread would have given.
"""

from __future__ import annotations

import contextlib
import logging
import marshal
import subprocess
import sys
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import Process

from broker.config import CredentialSettings
from broker.core.globs import is_glob
from broker.core.reads import FileRead
from broker.engine.holdback import WriterLook, changed_since
from broker.engine.read_worker import HEADER, HELLO
from broker.engine.reader import CredentialRead, file_read, read_credential, read_file

__all__ = ["PassPlan", "ReadWorker", "ReadWorkerError", "plan_pass"]

log = logging.getLogger("broker.engine")

#: The worker is started from the directory that holds this ``broker`` package, in
#: isolated mode without ``site`` (the standard library and two of our modules are all it
#: imports): neither the environment nor the working directory chooses what it runs.
_BOOT = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from broker.engine.read_worker import main; main()"
)
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
#: A frame larger than this is no answer of the worker's (a pass of 1,000 files of the
#: largest ``max_size`` stays far below it).
_MAX_FRAME = 1 << 34

#: One request: ``(path, max_size)`` pairs to read, and paths to ask about writers.
Request = tuple[list[tuple[str, int]], list[str]]


class ReadWorkerError(Exception):
    """The read worker did not answer as it should (gone, or not the worker at all)."""


class ReadWorker:
    """The read worker process, as the engine drives it: :meth:`feed` the requests (a task
    of their own), take each :meth:`answer` in order."""

    def __init__(self, process: Process) -> None:
        self._process = process
        assert process.stdout is not None and process.stdin is not None
        self._answers = process.stdout
        self._greeted = False

    @classmethod
    @contextlib.asynccontextmanager
    async def started(cls) -> AsyncIterator[ReadWorker | None]:
        """A running worker (``None`` if it cannot be started: the caller reads in threads);
        killed on exit, whatever it was doing."""
        try:
            process = await anyio.open_process(
                [sys.executable, "-I", "-S", "-c", _BOOT, _PACKAGE_ROOT],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            )
        except OSError as exc:
            log.warning(
                "cannot start the read worker; start-up reads in threads",
                extra={"error": exc.strerror or str(exc)},
            )
            yield None
            return
        try:
            yield cls(process)
        finally:
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.aclose()

    async def feed(self, requests: AsyncIterable[Request]) -> None:
        """Send every request, until ``requests`` ends (the worker reads the next once it
        has answered one, so this waits on it; a worker gone is noticed by
        :meth:`answer`)."""
        stdin = self._process.stdin
        assert stdin is not None
        try:
            async for request in requests:
                blob = marshal.dumps(request)
                await stdin.send(HEADER.pack(len(blob)) + blob)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            return

    async def answer(self, items: int) -> tuple[list[Any], dict[str, Any], set[str]]:
        """The answer to the next request, which had ``items`` files to read."""
        try:
            if not self._greeted:
                if tuple(await self._frame()) != HELLO:
                    raise ReadWorkerError("not the read worker")
                self._greeted = True
            raws, signatures, busy = await self._frame()
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError,
                anyio.ClosedResourceError) as exc:
            raise ReadWorkerError(f"the read worker ended ({self._process.returncode})") from exc
        except (ValueError, TypeError, EOFError) as exc:
            raise ReadWorkerError("the read worker's answer is unreadable") from exc
        if not (isinstance(raws, list) and len(raws) == items
                and isinstance(signatures, dict) and isinstance(busy, list)):
            raise ReadWorkerError("the read worker's answer is not one")
        return raws, signatures, set(busy)

    async def _frame(self) -> Any:
        (length,) = HEADER.unpack(await self._exactly(HEADER.size))
        if length > _MAX_FRAME:
            raise ValueError("frame too large")
        return marshal.loads(await self._exactly(length))  # noqa: S302

    async def _exactly(self, size: int) -> bytes:
        # Never more asked of the pipe than the frame holds, and the chunks joined once: a
        # growing buffer, sliced and copied (anyio's buffered stream) held a pass's answer
        # three or four times over at the start-up's peak.
        chunks: list[bytes] = []
        have = 0
        while have < size:
            try:
                chunk = await self._answers.receive(size - have)
            except anyio.EndOfStream as exc:
                raise anyio.IncompleteRead from exc
            chunks.append(chunk)
            have += len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


@dataclass
class PassPlan:
    """A start-up pass, split between the read worker and a worker thread."""

    #: What the worker reads: every file is a plain path (no pattern, no fallback).
    worker: dict[str, CredentialSettings] = field(default_factory=dict)
    #: What a thread reads (:func:`~broker.engine.reader.read_credential`).
    thread: dict[str, CredentialSettings] = field(default_factory=dict)
    #: Credentials seen for the first time: their writers are asked about right after.
    new: set[str] = field(default_factory=set)
    #: The worker's request: its files to read, and those of its new credentials to ask
    #: about.
    request: Request = field(default_factory=lambda: ([], []))

    def reads(
        self, raws: list[Any], signatures: Mapping[str, Any], busy: set[str]
    ) -> tuple[dict[str, CredentialRead], WriterLook]:
        """The worker's answer as reads of its credentials, and the look at their writers
        (which of the new ones a writer holds open, which changed since they were read)."""
        # The reads are asked for in the order the request listed them (each credential's
        # files in role order), so each is taken in turn: no table of them all.
        answers = zip(self.request[0], raws, strict=True)

        def fetched(role: str, path: str, max_size: int) -> FileRead:
            asked, raw = next(answers, ((None, None), None))
            if asked != (path, max_size) or raw is None:
                return read_file(role, path, max_size)  # never, but read rather than guess
            return file_read(role, path, max_size, raw)

        reads = {n: read_credential(spec, fetched) for n, spec in self.worker.items()}
        new = frozenset(n for n in self.worker if n in self.new)
        missing = object()  # a path not looked at is taken as changed, so it is asked again
        moved = changed_since(
            {n: reads[n].signatures for n in new}, lambda p: signatures.get(p, missing)
        )
        return reads, WriterLook(new, busy, moved)


def plan_pass(
    specs: Mapping[str, CredentialSettings], new: set[str]
) -> PassPlan:
    """Split a pass: plain files to the worker, the rest to a thread."""
    plan = PassPlan(new=set(new))
    for name, spec in specs.items():
        plain = spec.fallback is None and not any(is_glob(str(p)) for p in spec.files.values())
        (plan.worker if plain else plan.thread)[name] = spec
    plan.request = (
        [(str(p), s.max_size) for s in plan.worker.values() for p in s.files.values()],
        [str(p) for n, s in plan.worker.items() if n in new for p in s.files.values()],
    )
    return plan
