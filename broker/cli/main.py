"""The ``credbroker`` command line: ``run``, ``check``, ``presets``, ``status``, ``events``,
``fleet``."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AsyncExitStack

import anyio

from broker.app import Broker
from broker.cli import heap, logs
from broker.cli.hints import first_lines
from broker.cli.limits import raise_open_files_limit
from broker.cli.parsers import add_fleet_parser, add_remote_parsers
from broker.cli.sdnotify import Notifier
from broker.cli.table import print_report
from broker.config import Config, ConfigError, CredentialSettings, load_config
from broker.config.presets import PRESETS
from broker.core.fingerprint import Fingerprinter
from broker.core.machine import Observation
from broker.core.state import Problem, State, Status
from broker.engine.bus import Subscription
from broker.engine.evaluation import Evaluation, evaluate
from broker.engine.reader import read_credential
from broker.engine.store import KEY_FILE
from broker.engine.tuning import EngineTuning
from broker.engine.watcher import Watcher

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
    handler = {
        "run": _cmd_run,
        "check": _cmd_check,
        "presets": _cmd_presets,
        "status": _cmd_status,
        "events": _cmd_events,
        "fleet": _cmd_fleet,
    }[args.command]
    try:
        return handler(args)
    except ConfigError as exc:
        print(f"credbroker: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `credbroker check --json | head`: the reader left; say nothing more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


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
    add_remote_parsers(sub)  # status, events: clients of a running daemon's HTTP API
    add_fleet_parser(sub)  # every host's credentials from the MQTT retained states
    return parser


# The client commands import their HTTP and MQTT libraries only when they run.


def _cmd_status(args: argparse.Namespace) -> int:
    from broker.cli import remote

    return remote.cmd_status(args)


def _cmd_events(args: argparse.Namespace) -> int:
    from broker.cli import remote

    return remote.cmd_events(args)


def _cmd_fleet(args: argparse.Namespace) -> int:
    from broker.cli import fleet

    return fleet.cmd_fleet(args)


def _load(args: argparse.Namespace) -> Config:
    if not args.config:
        raise ConfigError([("", "no config file: pass -c FILE or set CREDBROKER_CONFIG")])
    return load_config(args.config)


# -- run ------------------------------------------------------------------------------------


def _cmd_run(args: argparse.Namespace) -> int:
    with heap.building():  # the config: the collector need not walk it again
        config = _load(args)
    logs.configure(args.log_level or config.broker.log_level, args.log_format,
                   host_id=config.broker.host_id)
    old, new = raise_open_files_limit()
    if new != old:
        logging.getLogger("broker.cli").debug(
            "raised the open-files limit", extra={"from": old, "to": new}
        )
    anyio.run(_serve, config, args.config)
    return EXIT_OK


#: A SIGHUP reload that has not finished after this long is given up (the old config stays).
RELOAD_TIMEOUT = 10.0


async def _serve(config: Config, path: str) -> None:
    import logging

    log = logging.getLogger("broker")
    notifier = Notifier()
    stopping = False

    async def reload(broker: Broker, done: anyio.Event) -> None:
        notifier.reloading()
        try:
            with anyio.move_on_after(RELOAD_TIMEOUT) as scope:
                try:
                    # Abandoned on cancel: a read stuck on a hung mount must not hold stop.
                    new = await anyio.to_thread.run_sync(load_config, path, abandon_on_cancel=True)
                except ConfigError as exc:
                    log.error(
                        "reload refused; keeping the running config", extra={"error": str(exc)}
                    )
                    return
                await broker.reload(new)
                heap.settle()  # the old settings are gone, the new ones built
            if scope.cancelled_caught:
                log.error(
                    "reload timed out; keeping the running config",
                    extra={"error": f"reading {path} took more than {RELOAD_TIMEOUT:g}s"},
                )
        finally:
            if not stopping:  # never READY after STOPPING
                notifier.ready(broker.states())
            done.set()

    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with AsyncExitStack() as stack:
            # Broker's __aenter__ returns once every credential has a state and every sink
            # serves: exactly systemd's READY. Every state and watch plan is built by then.
            with heap.building():
                broker = await stack.enter_async_context(Broker(config))
            tg = await stack.enter_async_context(anyio.create_task_group())
            # Subscribed before READY, so no change after it goes without a STATUS= update.
            changes = broker.subscribe("credentials.*") if notifier.enabled else None
            states = broker.states()
            notifier.ready(states)
            http = broker.sinks.get("http")
            for line in first_lines(states, getattr(http, "url", None), path):
                log.info(line)
            del states  # kept, it would hold every first state alive after its successor
            await tg.start(notifier.watchdog)
            if changes is not None:
                tg.start_soon(_follow_status, broker, notifier, changes)
            reloaded = anyio.Event()
            reloaded.set()
            async for signum in signals:
                if signum != signal.SIGHUP:
                    log.info("stopping", extra={"signal": signal.Signals(signum).name})
                    stopping = True
                    notifier.stopping()
                    break
                if not reloaded.is_set():
                    log.warning("reload already under way; this SIGHUP is ignored")
                    continue
                reloaded = anyio.Event()
                tg.start_soon(reload, broker, reloaded)
            tg.cancel_scope.cancel()  # a reload under way never delays stop


async def _follow_status(broker: Broker, notifier: Notifier, changes: Subscription) -> None:
    """Keep systemd's STATUS= (``systemctl status``) at the current counts."""
    async with changes:
        async for _ in changes:
            notifier.status(broker.states())


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
    from broker.sinks.deliveries import configured_outcomes

    deliveries = configured_outcomes(config)
    print_report(states, deliveries, as_json=args.json, out=sys.stdout)
    return EXIT_OK if all(s.status in _HEALTHY for s in states) else EXIT_PROBLEM


def check_now(
    config: Config, names: Sequence[str] = (), *, clock: Callable[[], float] = time.time
) -> list[State]:
    """Read the files of ``names`` (default all) now and derive their states.

    The engine's own pipeline (:func:`broker.engine.evaluation.evaluate`) with no previous
    state: no daemon, no writes, so generations are not known here, only status and
    problems. Credentials with ``validate`` settings are validated (one request each,
    concurrently); a ``refresh-failed`` problem the daemon last reported for the same
    content is shown.
    """
    from broker.engine.store import persisted_problems
    from broker.workers import validate
    from broker.workers.refresh import REFRESH_FAILED_CODE

    key = _read_key(config)
    fp = Fingerprinter(key)
    specs = [c for c in config.credentials if not names or c.name in names]
    now = clock()
    poll_every = min(EngineTuning().poll_interval, config.broker.resync_interval)
    # A failing refresh is only known to the daemon: show what it last reported about the
    # content that is there now.
    refresh_failed = (
        persisted_problems(config.broker.state_dir, REFRESH_FAILED_CODE)
        if any(spec.refresh is not None for spec in specs)
        else {}
    )

    def findings(spec: CredentialSettings) -> Callable[[Observation], list[Problem]]:
        found = refresh_failed.get(spec.name) if spec.refresh is not None else None

        def about(obs: Observation) -> list[Problem]:
            return [found[1]] if found is not None and found[0] == obs.fingerprint else []

        return about

    evaluated: list[Evaluation] = []
    to_validate: list[tuple[int, CredentialSettings, dict[str, bytes]]] = []
    with Watcher(lambda paths, scan: None) as watcher:
        watcher.watch(p for spec in specs for p in spec.watched_path_texts)
        for spec in specs:
            read = read_credential(spec)  # patterns expanded; the fallback when it applies
            ev = evaluate(
                read, fp, now,
                findings=findings(spec),
                polled_dirs=watcher.polled_dirs,
                poll_every=poll_every,
            )
            if spec.validate_ is not None and validate.worth_validating(ev.state):
                to_validate.append((len(evaluated), spec, validate.header_contents(read.reads)))
            evaluated.append(ev)
    if to_validate:
        verdicts = anyio.run(validate.validate_many, [(s, c) for _, s, c in to_validate])
        for (index, _, _), verdict in zip(to_validate, verdicts, strict=True):
            if verdict is not None and verdict.problem is not None:
                evaluated[index] = evaluated[index].with_findings([verdict.problem], now)
    from broker.engine.consumers_file import persisted_consumers

    states = [ev.state for ev in evaluated]
    return persisted_consumers(
        config.broker.state_dir, states, {spec.name: spec for spec in specs}, now
    )


def _read_key(config: Config) -> bytes:
    path = config.broker.fingerprint_key_file or config.broker.state_dir / KEY_FILE
    try:
        key = path.read_bytes().strip()
    except OSError:
        key = b""
    # Without the daemon's key a fingerprint still tells versions apart within this run.
    return key if len(key) >= 16 else secrets.token_hex(32).encode()


# -- presets --------------------------------------------------------------------------------


def _cmd_presets(args: argparse.Namespace) -> int:
    """Every preset, as data: what it reads, how, and what it takes."""
    for index, preset in enumerate(PRESETS.values()):
        if index:
            print()
        print(f"{preset.name}: {preset.description}")
        rows = [("files", line) for line in _preset_files(preset.files)]
        fmt = preset.format
        if preset.select:
            fmt += f'; only what select = "{preset.select}" names counts'
        rows.append(("format", fmt))
        expiry = ", else ".join(preset.expiry_sources)
        if len(preset.files) > 1:
            expiry += f" (from {preset.expiry_file or next(iter(preset.files))})"
        rows.append(("expiry", expiry))
        if preset.expiry_sources != ("none",):
            rows.append(
                ("expiring", _preset_window(preset.expiring_before, preset.expiring_fraction))
            )
        if preset.key_file:
            rows.append(("key check", f"{preset.key_file} must hold the certificate's key"))
        if preset.parameters:
            rows.append(
                (
                    "parameters",
                    ", ".join(
                        f'{name} = "{default}"' for name, default in preset.parameters.items()
                    ),
                )
            )
        if preset.fallback:
            fallback = preset.fallback
            sources = (fallback.expiry,) if isinstance(fallback.expiry, str) else fallback.expiry
            rows.append(
                (
                    "fallback",
                    f"while the expiry file is absent: {fallback.format}, "
                    f"expiry {', else '.join(sources)}",
                )
            )
            rows.extend(("", line) for line in _preset_files(fallback.files))
        if preset.refresh:
            rows.append(("refresh", " ".join(str(a) for a in preset.refresh.get("command", ()))))
        if preset.notes:
            rows.append(("note", preset.notes))
        previous = None
        for label, text in rows:
            shown = "" if label == previous else label + ":" if label else ""
            previous = label or previous
            print(f"  {shown:<12}{text}")
    return EXIT_OK


def _preset_files(files: Mapping[str, str]) -> list[str]:
    width = max(len(role) for role in files)
    return [
        f"{role:<{width}}  {path or f'(required: set files.{role})'}"
        for role, path in files.items()
    ]


def _preset_window(before: str | None, fraction: float | None) -> str:
    share = f"{(fraction if fraction is not None else 0.8):.0%}"
    if fraction is not None and abs(fraction - 2 / 3) < 1e-9:
        share = "2/3"
    return (
        f"{before or '15m'} before expiry, or at {share} of the lifetime where the issue "
        "time is known, whichever comes first"
    )
