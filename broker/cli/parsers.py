"""The command lines of the CLI's client commands (``status``, ``events``, ``fleet``).

Apart from the commands themselves, so that ``credbroker run`` builds its parser without
importing what only the clients need (aiohttp, aiomqtt: a third of the start-up's imports).
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["COLLECT_TIMEOUT", "DEFAULT_URL", "add_fleet_parser", "add_remote_parsers"]

#: Where ``status`` and ``events`` look for the daemon without ``--url``, ``-c`` or
#: ``$CREDBROKER_URL``.
DEFAULT_URL = "http://127.0.0.1:8790"
#: How long ``fleet`` waits for retained states by default.
COLLECT_TIMEOUT = 30.0


def add_remote_parsers(sub: Any) -> None:
    """Register ``status`` and ``events`` on the CLI's subparsers."""

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--url",
            help="the daemon's API: http://host:port or unix:/path "
            f"(default: from -c, else $CREDBROKER_URL, else {DEFAULT_URL})",
        )
        p.add_argument("-c", "--config", help="read the URL and token from this config's [http]")
        p.add_argument("--token-file", help="file holding the bearer token "
                                            "(default: $CREDBROKER_TOKEN_FILE or the config's)")

    status = sub.add_parser("status", help="show the state a running daemon reports")
    common(status)
    status.add_argument("--json", action="store_true", help="print state documents as JSON")
    events = sub.add_parser("events", help="follow a running daemon's events, one JSON per line")
    common(events)
    events.add_argument("--credential", metavar="NAME", help="only this credential's events")
    events.add_argument("--type", metavar="GLOB", help="only these event types, e.g. "
                                                       "credentials.expiring or credentials.*")
    events.add_argument("--since", type=int, metavar="ID", help="first replay the events after ID")


def add_fleet_parser(sub: Any) -> None:
    """The ``fleet`` subcommand."""
    p = sub.add_parser("fleet", help="every host's credentials from the MQTT retained states")
    p.add_argument("--mqtt", required=True, metavar="URL", help="mqtt://host:port or mqtts://")
    p.add_argument("--prefix", default="credbroker", help="topic prefix (default credbroker)")
    p.add_argument("--watch", action="store_true", help="keep following: a live table")
    p.add_argument("--json", action="store_true", help="print JSON (with --watch: a line each)")
    p.add_argument("--lag-after", default="60s", metavar="DURATION",
                   help="an older generation this long after a change is lagging (default 60s)")
    p.add_argument("--timeout", default=f"{COLLECT_TIMEOUT:g}s", metavar="DURATION",
                   help="give up collecting retained states after this long")
    p.add_argument("--username")
    p.add_argument("--password-file")
    p.add_argument("--ca-file")
