"""Reads that failed for the broker's own reasons (out of descriptors): counted for the
metrics, logged now and then with a count (never once per read), and retried by the engine
while the credential keeps its last state."""

from __future__ import annotations

import logging
import math

__all__ = ["ReadFaults"]

log = logging.getLogger("broker.engine")


class ReadFaults:
    """The count of broker faults, and when one was last logged."""

    def __init__(self, log_interval: float) -> None:
        self.log_interval = log_interval
        #: Every fault since start (a metric).
        self.count = 0
        self._unlogged = 0
        self._logged_at = -math.inf

    def record(self, name: str, fault: str, now: float) -> None:
        """Count a fault reading ``name``, logging it if none was logged lately."""
        self.count += 1
        self._unlogged += 1
        if now - self._logged_at >= self.log_interval:
            log.warning(
                "broker fault reading credential files; their last state is kept and the "
                "read retried",
                extra={"credential": name, "error": fault, "faults": self._unlogged},
            )
            self._logged_at, self._unlogged = now, 0
