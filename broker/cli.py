"""The ``credbroker`` command line: ``run``, ``check``, ``presets``."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import Sequence
from typing import TextIO

import anyio

from broker import logs
from broker.app import Broker
from broker.config import Config, ConfigError, load_config
from broker.durations import format_duration
from broker.engine import annotate_polling
from broker.fingerprint import Fingerprinter
from broker.machine import observe, transition
from broker.presets import PRESETS
from broker.reader import read_file
from broker.state import State, Status
from broker.store import KEY_FILE
from broker.watcher import Watcher

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_USAGE = 2
_HEALTHY = {Status.VALID, Status.EXPIRING}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``credbroker`` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    handler = {"run": _cmd_run, "check": _cmd_check, "presets": _cmd_presets}[args.command]
    try:
        return handler(args)
    except ConfigError as exc:
        print(f"credbroker: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="credbroker",
        description="Watch credential files and tell every consumer when one changes or expires.",
    )
    sub = parser.add_subparsers(dest="command")

    def config_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "-c",
            "--config",
            default=os.environ.get("CREDBROKER_CONFIG"),
            help="config file (default: $CREDBROKER_CONFIG)",
        )

    run = sub.add_parser("run", help="run the daemon")
    config_arg(run)
    run.add_argument("--log-format", choices=["text", "json"], default="text")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=None)

    check = sub.add_parser(
        "check", help="read the credential files now and report (no daemon needed)"
    )
    config_arg(check)
    check.add_argument(
        "names", nargs="*", metavar="NAME", help="credentials to check (default: all)"
    )
    check.add_argument("--json", action="store_true", help="print state documents as JSON")

    sub.add_parser("presets", help="list the built-in presets and their files")
    return parser


def _load(args: argparse.Namespace) -> Config:
    if not args.config:
        raise ConfigError([("", "no config file: pass -c FILE or set CREDBROKER_CONFIG")])
    return load_config(args.config)


# -- run ------------------------------------------------------------------------------------


def _cmd_run(args: argparse.Namespace) -> int:
    config = _load(args)
    logs.configure(args.log_level or config.broker.log_level, args.log_format)
    anyio.run(_serve, config, args.config)
    return EXIT_OK


async def _serve(config: Config, path: str) -> None:
    import logging

    log = logging.getLogger("broker")
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with Broker(config) as broker:
            async for signum in signals:
                if signum != signal.SIGHUP:
                    log.info("stopping", extra={"signal": signal.Signals(signum).name})
                    break
                try:
                    new = await anyio.to_thread.run_sync(load_config, path)
                except ConfigError as exc:
                    log.error(
                        "reload refused; keeping the running config", extra={"error": str(exc)}
                    )
                    continue
                await broker.reload(new)


# -- check ----------------------------------------------------------------------------------


def _cmd_check(args: argparse.Namespace) -> int:
    config = _load(args)
    unknown = [n for n in args.names if n not in {c.name for c in config.credentials}]
    if unknown:
        known = ", ".join(c.name for c in config.credentials) or "none"
        print(
            f"credbroker: unknown credential {', '.join(unknown)} (known: {known})", file=sys.stderr
        )
        return EXIT_USAGE
    states = check_now(config, args.names)
    if args.json:
        print(json.dumps({"credentials": [s.to_dict() for s in states]}, indent=2))
    else:
        print_table(states, sys.stdout)
    return EXIT_OK if all(s.status in _HEALTHY for s in states) else EXIT_PROBLEM


def check_now(config: Config, names: Sequence[str] = ()) -> list[State]:
    """Read the files of ``names`` (default all) now and derive their states.

    No daemon, no writes: generations are not known here, only status and problems.
    """
    key = _read_key(config)
    fp = Fingerprinter(key)
    specs = [c for c in config.credentials if not names or c.name in names]
    now = time.time()
    states: list[State] = []
    with Watcher(lambda paths, scan: None) as watcher:
        watcher.watch(str(p) for spec in specs for p in spec.files.values())
        for spec in specs:
            reads = [read_file(role, str(path), spec.max_size) for role, path in spec.files.items()]
            obs = annotate_polling(
                observe(spec, reads, fp), watcher.polled, config.broker.resync_interval
            )
            states.append(transition(spec, None, obs, now).state)
    return states


def _read_key(config: Config) -> bytes:
    path = config.broker.fingerprint_key_file or config.broker.state_dir / KEY_FILE
    try:
        key = path.read_bytes().strip()
    except OSError:
        key = b""
    # Without the daemon's key a fingerprint still tells versions apart within this run.
    return key if len(key) >= 16 else secrets.token_hex(32).encode()


def print_table(states: Sequence[State], out: TextIO, now: float | None = None) -> None:
    """The human table of ``check`` and ``status``: status, time left, fingerprint, problems."""
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


# -- presets --------------------------------------------------------------------------------


def _cmd_presets(args: argparse.Namespace) -> int:
    for preset in PRESETS.values():
        print(f"{preset.name}: {preset.description}")
        print(f"  format {preset.format}, expiry {preset.expiry}")
        for role, path in preset.files.items():
            print(f"  {role:<10} {path}")
    return EXIT_OK
