"""The start-up read worker: another process that reads credential files for the engine.

At start-up the engine reads every credential's files, pass after pass. Read in a worker
thread, each of the six system calls a file costs handed the interpreter lock back and
forth with the event loop, which was evaluating and publishing the pass before: the two
threads shared one core, and the hand-offs cost as much as the reads. This process reads
on another core instead and sends back what each call found (:func:`~broker.engine.rawread.
raw_read`), with the writer look of the credentials seen for the first time: what
:mod:`broker.engine.writers` says, asked right after the reads, as the thread asked it.

It imports the standard library and those two modules only (it starts in ~30 ms, and it is
started with ``-I -S``). The protocol, on stdin and stdout, is frames: a 4-byte big-endian
length, then a :mod:`marshal` blob. First the worker sends :data:`HELLO`; then, for each
request ``(items, look)`` (``items``: ``(path, max_size)`` pairs to read; ``look``: paths
to ask about), it answers ``(raws, signatures, busy)``: one raw read per item, each looked-at path's
signature (or ``None``) by path, and the looked-at paths a writer holds open.
End of input ends it. Nothing of a file's content is ever written anywhere but stdout.
"""

from __future__ import annotations

import contextlib
import marshal
import struct
import sys
from typing import Any, BinaryIO

from broker.engine.rawread import raw_read, signature_of
from broker.engine.writers import open_for_writing, stat_all

__all__ = ["HEADER", "HELLO", "main", "serve"]

#: The first frame: who is speaking, and the protocol version.
HELLO = ("credbroker-read-worker", 1)
#: A frame's length prefix.
HEADER = struct.Struct("!I")


def serve(requests: BinaryIO, answers: BinaryIO) -> None:
    """Answer every request read from ``requests`` on ``answers``, until end of input."""
    _send(answers, HELLO)
    while True:
        header = requests.read(HEADER.size)
        if len(header) < HEADER.size:
            return
        (length,) = HEADER.unpack(header)
        # marshal: the fastest of the standard library for tuples of bytes; both ends are
        # this program, over pipes nobody else holds.
        items, look = marshal.loads(requests.read(length))  # noqa: S302
        raws = [raw_read(path, max_size) for path, max_size in items]
        stats = stat_all(look)
        busy = sorted(open_for_writing(look, stats))
        signatures = {p: None if st is None else signature_of(st) for p, st in stats.items()}
        _send(answers, (raws, signatures, busy))


def _send(answers: BinaryIO, value: Any) -> None:
    blob = marshal.dumps(value)
    answers.write(HEADER.pack(len(blob)) + blob)
    answers.flush()


def main() -> None:
    """The worker's entry point (stdin and stdout are the engine's pipes)."""
    # The engine gone (or stopped before start-up was done) ends it quietly.
    with contextlib.suppress(BrokenPipeError, KeyboardInterrupt):
        serve(sys.stdin.buffer, sys.stdout.buffer)
