"""Start-up: the CLI's heap policy around building the heap."""

from __future__ import annotations

import gc
from typing import Any

from broker.cli import heap
from broker.core.fingerprint import Fingerprinter

FP = Fingerprinter(b"k" * 32)


def test_building_the_heap_collects_nothing_then_settles() -> None:
    class Cycle:
        def __init__(self) -> None:
            self.me = self

    collections: list[str] = []

    def callback(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            collections.append(phase)

    gc.callbacks.append(callback)
    try:
        with heap.building():
            assert not gc.isenabled()
            for _ in range(50_000):  # far past the threshold of an automatic collection
                Cycle()
            assert collections == []
        assert gc.isenabled()
        assert collections  # the settle's collection
        assert not any(isinstance(o, Cycle) for o in gc.get_objects())
    finally:
        gc.callbacks.remove(callback)
        gc.unfreeze()
