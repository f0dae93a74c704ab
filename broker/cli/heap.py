"""The daemon's garbage-collector policy: what ``credbroker run`` does, as owner of the process.

The long-lived heap (the config, every credential's settings, state and watch plan: about a
hundred objects per credential) is built once and then only referred to. Left in the
collector's oldest generation, each full collection walks all of it: with 10,000
credentials a rotation of all of them triggered several full collections of ~160 ms each.
:func:`building` and :func:`settle` move what is alive into the permanent generation once it
is built (the config load and start-up; a reload), so later collections see only what came
after. Frozen objects are still freed by reference counting; only reference cycles among
them would outlive their use, and every settle first unfreezes and collects, so a cycle
from an old config is collected at the next reload.

Both then hand the C heap's free memory back to the system (:func:`release_free_memory`):
start-up builds the long-lived heap while the MQTT publisher encodes, sends and frees the
first-sight events, and glibc keeps the holes those leave between long-lived blocks mapped
(6-7 MB at 10,000 credentials, a fifteenth of the daemon).

Only the CLI calls this: an application embedding :class:`broker.app.Broker` owns its
process and its collector.
"""

from __future__ import annotations

import ctypes
import functools
import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["building", "release_free_memory", "settle"]


@contextmanager
def building() -> Iterator[None]:
    """No automatic collection while the long-lived heap is built, then a freeze of it.

    Building it (the config's settings, then every credential's first state) allocates
    hundreds of thousands of objects that stay alive: each automatic collection on the way
    walks them for nothing (at 10,000 credentials, hundreds of collections, a fifth of a
    second of CPU in each of the two phases). Nor is it collected at the end: that found
    85-113 objects of garbage in 0.1 s, each time on the way to the first event. What
    garbage there is stays frozen until the next :func:`settle` (a reload) collects it.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()
        release_free_memory()


def settle() -> None:
    """Collect what is garbage now, then freeze everything still alive."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    release_free_memory()


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or ``None`` where the C library has none (musl). Looked up
    among the symbols the process already has (``find_library`` would run ``ldconfig``)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Return the C heap's free pages to the system (glibc's ``malloc_trim(0)``, every
    arena, a few ms); ``False`` where the C library cannot."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
