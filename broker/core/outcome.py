"""``Outcome``: what an action or a webhook last did (kind, name, runs, failures, last reason).

Reasons only, never secret bytes: outcomes are shown by ``credbroker check``,
``/v1/deliveries`` and metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from broker.core.timefmt import format_time

__all__ = ["Outcome"]


@dataclass(slots=True)
class Outcome:
    """What an action (or webhook) last did, for ``check``, ``/v1/deliveries`` and metrics."""

    kind: str
    name: str
    runs: int = 0
    failures: int = 0
    last_at: float | None = None
    last_ok: bool | None = None
    last_reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "runs": self.runs,
            "failures": self.failures,
            "last_at": format_time(self.last_at) if self.last_at is not None else None,
            "last_ok": self.last_ok,
            "last_reason": self.last_reason,
            **self.extra,
        }
