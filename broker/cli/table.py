"""The human table ``credbroker check`` and ``status`` print: one row per credential."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any, TextIO

from broker.core.durations import format_duration
from broker.core.state import State

__all__ = ["print_report", "print_table"]


def print_table(states: Sequence[State], out: TextIO, now: float | None = None) -> None:
    """The human table of ``check`` and ``status``: status, time left, fingerprint, problems
    and consumers."""
    from broker.engine.consumers import consumer_lines

    now = time.time() if now is None else now
    rows = [("CREDENTIAL", "STATUS", "EXPIRES IN", "FINGERPRINT")]
    for s in states:
        left = "-" if s.expires_at is None else format_duration(s.expires_at - now)
        rows.append((s.credential, s.status.value, left, s.fingerprint or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for i, row in enumerate(rows):
        print(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip(), file=out
        )
        if i == 0:
            continue
        for problem in states[i - 1].problems:
            print(f"    ! {problem.code}: {problem.message}", file=out)
            if problem.remedy:
                print(f"      fix: {problem.remedy}", file=out)
        for line in consumer_lines(states[i - 1], now):
            print(line, file=out)


def print_report(
    states: Sequence[State], deliveries: Sequence[dict[str, Any]], *, as_json: bool,
    out: TextIO,
) -> None:
    """What ``check`` and ``status`` print: the table and the deliveries, or one JSON document."""
    from broker.sinks.deliveries import print_outcomes

    if as_json:
        doc: dict[str, object] = {"credentials": [s.to_dict() for s in states]}
        if deliveries:
            doc["deliveries"] = list(deliveries)
        print(json.dumps(doc, indent=2), file=out)
    else:
        print_table(states, out)
        print_outcomes(deliveries, out)
