"""The engine's tunables, as one value: defaults for a daemon, shorter in tests."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_SETTLE", "EngineTuning"]

#: ``[broker] settle``'s default: how long a change that leaves a credential invalid or
#: missing waits for a further change that resolves it.
DEFAULT_SETTLE = 1.0


@dataclass(frozen=True, slots=True)
class EngineTuning:
    """How often the engine looks again, how long it waits for writers (seconds), and how
    many credentials one evaluation pass takes."""

    #: The scheduler re-evaluates at least this often, whatever it expects, so a wall-clock
    #: jump or a suspend is noticed within this bound.
    max_sleep: float = 30.0
    #: Every this many resyncs, every file is re-hashed even if its stat did not change.
    full_rehash_every: int = 10
    #: Paths the kernel would not watch are polled this often (capped by resync_interval).
    poll_interval: float = 2.0
    #: A read that failed for the broker's own reasons (out of descriptors) is retried this
    #: often; the credential keeps its last state meanwhile.
    fault_retry: float = 0.5
    #: Such faults are logged at most once per this many seconds (with a count), never per
    #: read.
    fault_log_interval: float = 60.0
    #: A writer that keeps its file open never closes it: once it has not modified the file
    #: for this long, the content is read, and read again this long later; the same both
    #: times, it is published even though the writer still holds the file.
    writer_quiet: float = 0.25
    #: Content a held-open writer leaves unparsable (``cmd > file`` before the command
    #: writes) is far more often half-done than final: it must hold still this long.
    writer_quiet_invalid: float = 5.0
    #: A watched directory with at least this many events a second for names nothing
    #: watches, over a resync interval (and at least ``noisy_min`` of them), floods the
    #: broker.
    noisy_rate: float = 200.0
    noisy_min: int = 1000
    #: One evaluation pass reads, evaluates and commits (one journal line) at most this many
    #: credentials; more (start-up, a mass rotation, a full resync) take several passes, so
    #: what a pass holds (every file's bytes, the evaluations, the journal line, the events)
    #: stays bounded however many credentials there are. A pass costs a thread hop and an
    #: fsync, so this is large enough for those to be lost in the work.
    max_batch: int = 1000
    #: While changes keep arriving during passes (a burst), a pass begins at most this
    #: often and takes everything that arrived meanwhile; a change that finds the engine
    #: idle is evaluated at once. A pass costs about a millisecond of CPU whatever it holds
    #: (the lock, two thread hand-offs, the journal line, a dozen event-loop turns; measured
    #: on a lone change), so a writer trickling 10,000 files in 1,500 passes paid ~150 us per
    #: credential for them; at most this much more latency in a burst instead.
    burst_gap: float = 0.05
    #: A pass gives the event loop back after this many credentials evaluated, and (at
    #: start-up) again after this many events published, so that the sinks send while it
    #: runs. A start-up
    #: pass of 1,000 took ~80 ms of the loop in one go: the MQTT window (100 in flight)
    #: drained in a few of them and the server waited for the rest, and the last events
    #: reached a subscriber up to 0.8 s after the last pass.
    yield_every: int = 50
    #: Start-up's reads ahead of the loop are made by a worker process
    #: (:mod:`broker.engine.read_worker`) rather than a worker thread, whose every system
    #: call waited for the interpreter lock the loop held: at 10,000 credentials, 0.4 s of
    #: the daemon's CPU less, on the core the loop does not use. ``False`` (or a worker
    #: that cannot start) reads in threads.
    read_worker: bool = True

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if self.yield_every < 1:
            raise ValueError("yield_every must be at least 1")
        if self.burst_gap < 0:
            raise ValueError("burst_gap must not be negative")
