"""Process resource limits the daemon adjusts for itself at start."""

from __future__ import annotations

import resource


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; return (old soft, new soft).

    A systemd-style soft limit of 1,024 is what a few hundred idle clients exhaust; the
    hard limit is what the administrator actually granted. It is never lowered.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Linux refuses an infinite RLIMIT_NOFILE soft limit; fs.nr_open is the real ceiling.
    target = _nr_open() if hard == resource.RLIM_INFINITY else hard
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft, soft
    return soft, target


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open", encoding="ascii") as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return 1 << 20
