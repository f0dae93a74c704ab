"""Validation (SPEC section 2, ``validate``): ask the real API whether it accepts the credential.

One GET to ``validate.url`` with ``validate.header`` filled from the credential's files
(``{role}`` -> that role's content, stripped). The answer becomes a finding of source
``"validate"`` through the port (:meth:`broker.port.BrokerPort.report`):

- a status in ``expect`` clears the finding;
- 401/403: ``rejected-by-validator``, tied to the fingerprint the request was made with, which
  makes that content ``invalid`` (new content drops the finding);
- no answer (timeout, connection or TLS error): ``validator-unreachable``, status unchanged;
- anything else: ``validator-unexpected-status``, status unchanged.

Decisions worth knowing:

- The header value and the response body never reach a log line, a problem or an exception:
  messages name only the url's host, the status and what failed. The body is never read.
- Redirects are not followed (the credential would travel to wherever the server points);
  a 3xx is an unexpected status unless ``expect`` lists it. No cookies are kept, no proxy
  settings are taken from the environment, TLS is verified with the default context.
- The daemon validates at start, after every ``refreshed`` event of the credential, every
  ``interval``, and on a forced check (:meth:`Validator.validate_now`). Content that is
  missing, expired or invalid for reasons of its own is not sent anywhere.
- A forced check is bounded: within :data:`MIN_INTERVAL` of the last request for the same
  content it answers from that verdict (:meth:`Validator.last_verdict` says when it was
  made), so no local user can make the broker hammer the remote API with the credential
  and get it rate-limited or locked. New content is validated at once.
- ``credbroker check`` validates too, without a daemon: :func:`validate_many`, then
  :func:`broker.core.machine.apply_findings` as the engine does.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import shlex
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import aiohttp
import anyio
from anyio.abc import TaskStatus

from broker.aio.wakeup import Wakeup
from broker.config import CredentialSettings, ValidateSettings
from broker.core.errors import BrokerError
from broker.core.machine import REJECTING_CODES
from broker.core.state import Problem, State, Status
from broker.port import SinkContext, SinkHealth

if TYPE_CHECKING:
    from broker.engine.reader import FileRead

__all__ = [
    "REJECTED",
    "UNEXPECTED",
    "UNREACHABLE",
    "VALIDATOR_CODES",
    "Validator",
    "Verdict",
    "build_header",
    "probe",
    "validate_many",
    "worth_validating",
]

log = logging.getLogger("broker.validate")

REJECTED = "rejected-by-validator"
UNREACHABLE = "validator-unreachable"
UNEXPECTED = "validator-unexpected-status"
VALIDATOR_CODES = frozenset({REJECTED, UNREACHABLE, UNEXPECTED})
#: Findings that make unchanged content invalid (the same set as the engine's).
_REJECTING_STATUS = frozenset({401, 403})
#: A forced check inside this many seconds of the last request for the same content reuses
#: that request's verdict.
MIN_INTERVAL = 30.0
_PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")
# Header values may hold visible ASCII/UTF-8 and spaces/tabs; no other control characters.
_BAD_HEADER_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


# --------------------------------------------------------------------------------------------
# One request


@dataclass(frozen=True, slots=True)
class Verdict:
    """The answer of one validation: ``problem`` is ``None`` when the API accepted it."""

    problem: Problem | None
    status: int | None = None

    @property
    def rejected(self) -> bool:
        return self.problem is not None and self.problem.code in REJECTING_CODES


class HeaderError(BrokerError):
    """The header cannot be built from the files (the message never holds their content)."""


def url_host(url: str) -> str:
    """``host[:port]`` of ``url``: all of it a message may show (path and query may be secret)."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{parts.port}" if parts.port is not None else host


def _human(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def build_header(settings: ValidateSettings, contents: Mapping[str, bytes]) -> tuple[str, str]:
    """``(name, value)`` of the header with every ``{role}`` filled from ``contents``.

    Raises :class:`HeaderError` when a role's content is absent, not UTF-8, or would not fit
    in one header line.
    """
    if settings.header is None:
        raise HeaderError("no header configured")
    name, _, template = settings.header.partition(":")

    def fill(match: re.Match[str]) -> str:
        role = match.group(1)
        data = contents.get(role)
        if data is None:
            raise HeaderError(f"the {role} file could not be read")
        try:
            text = data.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise HeaderError(f"the {role} file is not UTF-8 text") from None
        if not text or _BAD_HEADER_CHARS.search(text):
            raise HeaderError(f"the {role} file is empty or spans several lines")
        return text

    return name.strip(), _PLACEHOLDER_RE.sub(fill, template).strip()


def _remedy(spec: CredentialSettings, code: str, fallback: str) -> str:
    role = spec.expiry_file
    if f"{code}:{role}" in spec.remedies or code in spec.remedies:
        configured = spec.remedy(code, role)
        if configured:
            return configured
    return fallback


def _rejected(spec: CredentialSettings, host: str, status: int) -> Problem:
    refresh = spec.refresh
    if refresh is not None:
        fallback = f"get a new credential: {shlex.join(refresh.command)}"
    else:
        # The "expired" remedy says how to renew this credential (presets name the command).
        fallback = spec.remedy("expired", spec.expiry_file) or "renew the credential"
    return Problem(REJECTED, f"{host} answered {status}", _remedy(spec, REJECTED, fallback))


def _unreachable(spec: CredentialSettings, settings: ValidateSettings, what: str) -> Problem:
    host = url_host(settings.url)
    fallback = (
        f"check network access to {host}; the broker retries every {_human(settings.interval)}"
    )
    return Problem(UNREACHABLE, what, _remedy(spec, UNREACHABLE, fallback))


def _unexpected(spec: CredentialSettings, settings: ValidateSettings, status: int) -> Problem:
    host = url_host(settings.url)
    expected = ", ".join(str(s) for s in settings.expect)
    fallback = (
        f"check validate.url and validate.expect in the config, and the service at {host}; "
        f"the broker retries every {_human(settings.interval)}"
    )
    return Problem(
        UNEXPECTED,
        f"{host} answered {status}, expected {expected}",
        _remedy(spec, UNEXPECTED, fallback),
    )


async def probe(
    session: aiohttp.ClientSession, spec: CredentialSettings, contents: Mapping[str, bytes]
) -> Verdict:
    """Send the validation request for ``spec`` and judge the answer. Never raises
    (except :class:`HeaderError` when the header cannot be built, and cancellation)."""
    settings = spec.validate_
    if settings is None:
        raise ValueError(f"credential {spec.name!r} has no validate settings")
    headers = dict([build_header(settings, contents)]) if settings.header is not None else {}
    host = url_host(settings.url)
    timeout = settings.timeout
    try:
        with anyio.fail_after(timeout):
            if urlsplit(settings.url).scheme == "http" and not await _only_loopback(settings.url):
                # The config allows plain http to loopback names only; a name that resolves
                # elsewhere now (a changed /etc/hosts) would carry the credential in clear.
                what = f"{host} resolves to a non-loopback address; not sent over plain http"
                return Verdict(_unreachable(spec, settings, what))
            async with session.get(
                settings.url,
                headers=headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as response:
                status = response.status
    except TimeoutError:
        what = f"{host} did not answer within {_human(timeout)}"
        return Verdict(_unreachable(spec, settings, what))
    except aiohttp.ClientConnectorCertificateError:
        what = f"TLS certificate of {host} could not be verified"
        return Verdict(_unreachable(spec, settings, what))
    except aiohttp.ClientSSLError:
        return Verdict(_unreachable(spec, settings, f"TLS handshake with {host} failed"))
    except aiohttp.ClientConnectorError as exc:
        errno = exc.os_error.errno
        reason = os.strerror(errno) if errno else type(exc.os_error).__name__
        return Verdict(_unreachable(spec, settings, f"cannot connect to {host}: {reason}"))
    except aiohttp.ServerDisconnectedError:
        what = f"{host} closed the connection without answering"
        return Verdict(_unreachable(spec, settings, what))
    except (aiohttp.ClientError, OSError) as exc:
        # Only the class name: an exception's text could quote a header.
        what = f"request to {host} failed ({type(exc).__name__})"
        return Verdict(_unreachable(spec, settings, what))
    if status in settings.expect:
        return Verdict(None, status)
    if status in _REJECTING_STATUS:
        return Verdict(_rejected(spec, host, status), status)
    return Verdict(_unexpected(spec, settings, status), status)


async def _only_loopback(url: str) -> bool:
    """Whether every address ``url``'s host resolves to now is a loopback address."""
    parts = urlsplit(url)
    try:
        infos = await anyio.getaddrinfo(parts.hostname or "", parts.port or 80,
                                        type=socket.SOCK_STREAM)
    except OSError:
        return True  # no address at all: the connection attempt reports it
    return all(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]).is_loopback
               for info in infos)


def header_contents(reads: Iterable[FileRead]) -> dict[str, bytes]:
    """Role -> content, for the roles read as exactly one file (a header takes one value)."""
    by_role: dict[str, list[bytes | None]] = {}
    for read in reads:
        by_role.setdefault(read.info.role, []).append(read.content)
    return {role: found[0] for role, found in by_role.items() if len(found) == 1 and found[0]}


def worth_validating(state: State) -> bool:
    """Content worth sending: usable, not expired, or invalid only by a validator's verdict."""
    if state.status in (Status.VALID, Status.EXPIRING):
        return True
    return (
        state.status is Status.INVALID
        and bool(state.problems)
        and state.problems[0].code in REJECTING_CODES
    )


def new_session() -> aiohttp.ClientSession:
    """A client session for validation: no cookies kept, no proxy from the environment."""
    return aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(), trust_env=False)


# --------------------------------------------------------------------------------------------
# Without a daemon (`credbroker check`)


async def validate_many(
    items: Sequence[tuple[CredentialSettings, Mapping[str, bytes]]],
) -> list[Verdict | None]:
    """Validate each ``(spec, contents)`` concurrently; ``None`` where no request was made."""
    results: list[Verdict | None] = [None] * len(items)

    async def one(index: int, session: aiohttp.ClientSession) -> None:
        spec, contents = items[index]
        try:
            results[index] = await probe(session, spec, contents)
        except HeaderError as exc:
            log.warning("cannot validate", extra={"credential": spec.name, "error": str(exc)})

    if items:
        async with new_session() as session, anyio.create_task_group() as tg:
            for index in range(len(items)):
                tg.start_soon(one, index, session)
    return results


# --------------------------------------------------------------------------------------------
# The sink


class Validator:
    """Validates credentials that have ``validate`` settings (a broker sink)."""

    name = "validate"

    def __init__(self, context: SinkContext, *, min_interval: float | None = None) -> None:
        self._port = context.port
        self.min_interval = MIN_INTERVAL if min_interval is None else min_interval
        #: name -> (anyio time, wall-clock time, fingerprint) of the last request made.
        self._last: dict[str, tuple[float, float, str | None]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._locks: dict[str, anyio.Lock] = {}
        self._wakeups: dict[str, Wakeup] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        #: Requests made, and of those without an expected answer (for metrics).
        self.requests = 0
        self.failures = 0

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with (
            new_session() as session,
            self._port.subscribe("credentials.refreshed") as events,
            anyio.create_task_group() as tg,
        ):
            self._session = session
            self._tg = tg
            try:
                for name in self._port.names():
                    self._poke(name)  # the first run of each loop validates at once
                task_status.started()
                async for event in events:
                    self._poke(event.subject)
            finally:
                self._session = None
                self._tg = None

    async def validate_now(self, name: str) -> State:
        """Validate ``name`` now (the daemon's forced check) and return its state.

        ``KeyError`` for an unknown credential; a credential without ``validate`` settings
        (or with content not worth sending) is returned as it is.
        """
        await self._validate(name, forced=True)
        return self._port.state(name)

    def last_verdict(self, name: str) -> float | None:
        """When (wall clock) the verdict ``name``'s state carries was made; ``None`` if never."""
        last = self._last.get(name)
        return last[1] if last is not None else None

    def health(self) -> SinkHealth:
        """Requests made (``delivered``) and of those without an expected answer."""
        return SinkHealth(
            self.name, delivers=False, delivered=self.requests, failures=self.failures
        )

    def close(self) -> None:
        """Nothing to let go of: the subscription is made by ``run``."""

    def _poke(self, name: str) -> None:
        try:
            spec = self._port.settings(name)
        except KeyError:
            return
        if spec.validate_ is None or self._tg is None:
            return
        wakeup = self._wakeups.get(name)
        if wakeup is None:
            wakeup = self._wakeups[name] = Wakeup()
            self._tg.start_soon(self._loop, name, wakeup, name=f"validate {name}")
        wakeup.poke()

    async def _loop(self, name: str, wakeup: Wakeup) -> None:
        port = self._port
        try:
            await wakeup.wait()
            while True:
                try:
                    settings = port.settings(name).validate_
                except KeyError:
                    return  # dropped from the config
                if settings is None:
                    return
                try:
                    await self._validate(name)
                except KeyError:
                    return
                except Exception as exc:
                    # Only the class: a bug's exception text could quote the request.
                    log.error(
                        "validation error",
                        extra={"credential": name, "error": type(exc).__name__},
                    )
                # Until the next interval, or sooner when new content is refreshed.
                await wakeup.wait(settings.interval)
        finally:
            self._wakeups.pop(name, None)

    async def _validate(self, name: str, *, forced: bool = False) -> None:
        port = self._port
        spec = port.settings(name)  # KeyError for an unknown name
        if spec.validate_ is None:
            return
        lock = self._locks.setdefault(name, anyio.Lock())
        async with lock:
            session = self._session
            state = port.state(name)
            if session is None or not worth_validating(state):
                return
            last = self._last.get(name)
            now = anyio.current_time()
            if (
                forced
                and last is not None
                and last[2] == state.fingerprint
                and now - last[0] < self.min_interval
            ):
                log.debug("validation answered from the last verdict", extra={"credential": name})
                return
            self._last[name] = (now, port.clock(), state.fingerprint)
            contents = header_contents(await anyio.to_thread.run_sync(port.read_files, name))
            self.requests += 1
            try:
                verdict = await probe(session, spec, contents)
            except HeaderError as exc:
                log.warning("cannot validate", extra={"credential": name, "error": str(exc)})
                return
            if verdict.problem is None:
                log.debug(
                    "validator accepted",
                    extra={"credential": name, "http_status": verdict.status},
                )
                if any(p.code in VALIDATOR_CODES for p in port.state(name).problems):
                    await port.report(name, "validate", None)
                return
            self.failures += 1
            log.warning(
                "validation failed",
                extra={
                    "credential": name,
                    "code": verdict.problem.code,
                    "error": verdict.problem.message,
                },
            )
            await port.report(
                name,
                "validate",
                verdict.problem,
                fingerprint=state.fingerprint if verdict.rejected else None,
            )
