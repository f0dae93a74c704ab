"""What the daemon tells the person who just started it: where to look, what to try next."""

from __future__ import annotations

from collections.abc import Iterable

from broker.core.state import State


def first_lines(states: Iterable[State], url: str | None, config_path: str) -> list[str]:
    """The lines logged once the daemon is ready (pure: no I/O, no clock).

    ``url`` is where the HTTP API listens (``None`` when it is off); every problem of a
    credential gets its remedy, so a first run ends with the command that fixes it.
    """
    lines: list[str] = []
    if url is None:
        lines.append(
            "no [http] section: add one (listen = \"127.0.0.1:8790\") for the status page, "
            "`credbroker status` and `credbroker events`"
        )
    else:
        page = url + "/" if url.startswith("http") else f"{url} (unix socket)"
        lines.append(f"status page: {page}  API: {url}/v1/credentials")
        flag = f" --url {url}" if not url.startswith("http") else ""
        lines.append(
            f"try: credbroker status -c {config_path}{flag}   "
            f"follow events: credbroker events -c {config_path}{flag}"
        )
    for state in states:
        for problem in state.problems:
            if problem.remedy:
                lines.append(f"{state.credential} is {state.status.value}: {problem.remedy}")
    return lines
