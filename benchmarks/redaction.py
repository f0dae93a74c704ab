"""Cost of redacting a refresh command's stderr, against a floor measured in the same run.

    python -m benchmarks.redaction [--smoke]

For secrets of 1, 16 and 64 KiB in total and the 16 KiB of stderr the broker keeps, it times
``Redactor.of`` (building the 8-gram index of every encoded form) and ``Redactor.redact``, and
prints them with two references from the same run: the floor (one ``bytes.find`` of a single
8-byte needle over the stderr, the least any scan can cost) and the quadratic approach the
index replaces (``find`` of every 8-byte run of every secret in the stderr).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

from benchmarks.common import markdown
from broker.core.redaction import MIN_RUN, Redactor

STDERR = 16 * 1024


def _best(fn: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="fewer repetitions")
    args = parser.parse_args()
    repeat = 2 if args.smoke else 7
    stderr = (b"error: request failed with status 401; retrying in 5s\n" * 400)[:STDERR]
    needle = os.urandom(MIN_RUN).hex()[:MIN_RUN].encode()
    floor = _best(lambda: stderr.lower().find(needle), repeat * 20)
    rows = []
    for kib in (1, 16, 64):
        secret = os.urandom(kib * 1024 // 2).hex().encode()
        build = _best(lambda s=secret: Redactor.of([s]), repeat)  # type: ignore[misc]
        redactor = Redactor.of([secret])
        data = stderr + secret[100:140]
        run = _best(lambda r=redactor, d=data: r.redact(d), repeat)  # type: ignore[misc]

        def quadratic(s: bytes = secret, data: bytes = data) -> None:
            for i in range(len(s) - MIN_RUN + 1):
                data.find(s[i : i + MIN_RUN])

        naive = _best(quadratic, 1 if kib > 1 else repeat)
        rows.append({
            "secrets_kib": kib,
            "index_ms": round(build * 1e3, 2),
            "redact_ms": round(run * 1e3, 2),
            "floor_ms": round(floor * 1e3, 4),
            "redact_vs_floor": round(run / floor, 1),
            "quadratic_ms": round(naive * 1e3, 1),
            "quadratic_vs_redact": round(naive / run, 1),
        })
    print(markdown(rows, list(rows[0])))


if __name__ == "__main__":
    main()
