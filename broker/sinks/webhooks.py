"""Webhooks (SPEC section 2, ``[[webhooks]]``): POST each matching event, at least once.

:class:`Webhooks` is a broker sink with one :class:`Outbox` per webhook. Every matching event
is first made durable in the outbox, then delivered with the CloudEvents HTTP binding
(structured: the CloudEvent as ``application/cloudevents+json``; binary: ``ce-*`` headers and
the state document as body) and signed per Standard Webhooks when ``secret_file`` is set:
``webhook-id`` (= the CloudEvent id, so a redelivery is recognisable), ``webhook-timestamp``
(of the attempt) and ``webhook-signature`` (``v1,`` base64 HMAC-SHA256 of
``id.timestamp.body`` under the base64-decoded ``whsec_`` secret).

Any 2xx is delivery; anything else (a 3xx too: redirects are not followed) is retried with
capped backoff and full jitter (1 s .. 10 m) while the credential's later events wait; other
credentials proceed. One ``aiohttp.ClientSession`` per webhook reuses connections. The secret
file is re-read for every attempt (so fixing its permissions needs no restart) and must not
be readable by group or others; no secret goes into a request except as the signature.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import logging
import random
from collections.abc import Callable
from pathlib import Path

import aiohttp
import anyio
from anyio.abc import TaskGroup, TaskStatus

from broker.aio.secretfile import SecretFileError, read_secret_file
from broker.config import WebhookSettings
from broker.core.backoff import backoff_delay
from broker.core.errors import BrokerError
from broker.core.events import CONTENT_TYPE, DATACONTENTTYPE, SPECVERSION, Event, encode, make_event
from broker.core.machine import EXPIRED, EXPIRING, INVALID, MISSING, REFRESHED
from broker.core.timefmt import parse_time
from broker.port import SinkContext, SinkHealth
from broker.sinks.actions import matches
from broker.sinks.deliveries import Outcome, OutcomeFile
from broker.sinks.outbox import DEFAULT_LIMIT, Outbox

__all__ = ["Webhooks", "read_secret", "request_for", "sign"]

log = logging.getLogger("broker.webhooks")

#: The event that announces a status (for re-announcing a persisted state).
_STATUS_EVENT = {
    "valid": REFRESHED,
    "expiring": EXPIRING,
    "expired": EXPIRED,
    "invalid": INVALID,
    "missing": MISSING,
}
BACKOFF_BASE = 1.0
BACKOFF_CAP = 600.0
#: Requests in flight per webhook at once (over all credentials).
MAX_CONCURRENT = 16
_SECRET_MAX = 4096
_PREFIX = "whsec_"


class SecretError(BrokerError):
    """The secret file cannot be used; the message says why and how to fix it."""


def read_secret(path: Path) -> bytes:
    """The HMAC key from a ``whsec_<base64>`` file that only its owner may read."""
    try:
        raw = read_secret_file(path, limit=_SECRET_MAX, refuse_mode=0o077).data
    except SecretFileError as exc:
        raise SecretError(_secret_refusal(path, exc)) from None
    text = raw.decode("ascii", "replace").strip()
    # Never quote the file: it is the secret.
    if not text.startswith(_PREFIX):
        raise SecretError(f"secret_file {path} does not hold a whsec_... secret")
    try:
        key = base64.b64decode(text[len(_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise SecretError(f"secret_file {path}: the part after whsec_ is not base64") from None
    if len(key) < 16:
        raise SecretError(f"secret_file {path}: the secret is shorter than 16 bytes")
    return key


def _secret_refusal(path: Path, exc: SecretFileError) -> str:
    """Why ``secret_file`` cannot be used, and how to fix it (never its content)."""
    if exc.reason == "missing":
        return f"secret_file {path} not found"
    if exc.reason in ("directory", "not-regular"):
        return f"secret_file {path} is not a regular file"
    if exc.reason == "permissions":
        return (
            f"secret_file {path} is readable by others (mode {exc.mode & 0o777:04o}); "
            f"fix: chmod 600 {path}"
        )
    if exc.reason == "too-large":
        return f"secret_file {path} does not hold a whsec_... secret"
    detail = exc.detail or ("Permission denied" if exc.reason == "denied" else "unreadable")
    return f"cannot open secret_file {path}: {detail}"


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The Standard Webhooks ``webhook-signature`` value (``v1,<base64 HMAC-SHA256>``)."""
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def request_for(
    event: Event, mode: str, key: bytes | None, now: float
) -> tuple[dict[str, str], bytes]:
    """Headers and body of the POST for ``event`` (pure: ``now`` is the attempt's time)."""
    if mode == "binary":
        body = encode(event.data.to_dict())
        headers = {
            "content-type": DATACONTENTTYPE,
            "ce-specversion": SPECVERSION,
            "ce-id": event.id,
            "ce-source": event.source,
            "ce-type": event.type,
            "ce-subject": event.subject,
            "ce-time": event.time,
        }
    else:
        body = event.payload
        headers = {"content-type": CONTENT_TYPE}
    timestamp = int(now)
    headers["webhook-id"] = event.id
    headers["webhook-timestamp"] = str(timestamp)
    if key is not None:
        headers["webhook-signature"] = sign(key, event.id, timestamp, body)
    return headers, body


class _Endpoint:
    """One webhook: its outbox, session, and one delivery loop per credential with events."""

    def __init__(self, owner: Webhooks, hook: WebhookSettings, state_dir: Path) -> None:
        self.owner = owner
        self.hook = hook
        self.outbox = Outbox(state_dir / f"outbox-{hook.name}.jsonl", owner.limit)
        self.outcome = Outcome("webhook", hook.name)
        self.delivered = 0
        self.retrying: set[str] = set()
        self.active: set[str] = set()
        self.limiter = anyio.Semaphore(MAX_CONCURRENT)
        self.session: aiohttp.ClientSession | None = None
        self.lock = anyio.Lock()  # outbox writes, one at a time, in a worker thread

    def oldest_age(self, now: float) -> float:
        """Age of the oldest undelivered event, from its own CloudEvent ``time``.

        The event's time survives restarts, unlike a note of when it was queued.
        """
        ages: list[float] = []
        for name in self.outbox.credentials():
            head = self.outbox.head(name)
            if head is not None:
                with contextlib.suppress(ValueError):
                    ages.append(now - parse_time(head.time))
        return max(0.0, max(ages, default=0.0))

    def kick(self, tg: TaskGroup) -> None:
        # A running loop picks up what was queued behind its head by itself.
        for name in self.outbox.credentials():
            if name not in self.active:
                self.active.add(name)
                tg.start_soon(self.deliver_all, name, name=f"webhook {self.hook.name} {name}")

    async def deliver_all(self, name: str) -> None:
        attempt = 0
        try:
            while (event := self.outbox.head(name)) is not None:
                try:
                    ok = await self.deliver(event)
                except Exception:  # a bug here must not stop the broker: retry later
                    log.exception("webhook error", extra={"webhook": self.hook.name})
                    ok = False
                if ok:
                    attempt = 0
                    self.retrying.discard(name)
                    try:
                        async with self.lock:
                            await anyio.to_thread.run_sync(self.outbox.done, [event.id])
                    except OSError as exc:
                        # Delivered, but the outbox still lists it: after a restart it is
                        # sent again, with the same webhook-id (at least once).
                        log.error(
                            "webhook outbox write failed",
                            extra={"webhook": self.hook.name, "error": exc.strerror or str(exc)},
                        )
                    # Counted once the outbox let go of it: "delivered" and "pending" read
                    # together never count one event twice.
                    self.delivered += 1
                    continue
                self.retrying.add(name)
                delay = backoff_delay(attempt, self.owner.base, self.owner.cap, self.owner.rand)
                attempt += 1
                await anyio.sleep(delay)
        finally:
            self.active.discard(name)
            self.retrying.discard(name)

    async def deliver(self, event: Event) -> bool:
        hook = self.hook
        self.outcome.runs += 1
        try:
            key = (
                await anyio.to_thread.run_sync(read_secret, hook.secret_file)
                if hook.secret_file is not None
                else None
            )
        except SecretError as exc:
            return self._failed(str(exc))
        headers, body = request_for(event, hook.mode, key, self.owner.clock())
        assert self.session is not None
        async with self.limiter:
            try:
                async with self.session.post(
                    hook.url,
                    data=body,
                    headers=headers,
                    allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=hook.timeout),
                ) as response:
                    await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                return self._failed(f"request failed: {type(exc).__name__}")
        if 200 <= status < 300:
            self.outcome.last_at, self.outcome.last_ok = self.owner.clock(), True
            self.outcome.last_reason = f"HTTP {status}"
            self.owner.outcome_file.changed()
            return True
        return self._failed(f"HTTP {status}")

    def _failed(self, reason: str) -> bool:
        if self.outcome.last_ok is not False or self.outcome.last_reason != reason:
            log.warning(
                "webhook delivery failed", extra={"webhook": self.hook.name, "error": reason}
            )
        self.outcome.failures += 1
        self.outcome.last_at, self.outcome.last_ok, self.outcome.last_reason = (
            self.owner.clock(),
            False,
            reason,
        )
        self.owner.outcome_file.changed()
        return False


class Webhooks:
    """Delivers events to the configured ``[[webhooks]]`` (a broker sink).

    ``base``/``cap`` (seconds) and ``rand`` shape the retry backoff (default 1 s .. 10 m);
    ``limit`` bounds each outbox.
    """

    name = "webhooks"

    def __init__(
        self,
        context: SinkContext,
        *,
        base: float | None = None,
        cap: float | None = None,
        rand: Callable[[], float] | None = None,
        limit: int = DEFAULT_LIMIT,
    ) -> None:
        port = self._port = context.port
        self.clock = port.clock
        self.base = BACKOFF_BASE if base is None else base
        self.cap = BACKOFF_CAP if cap is None else cap
        self.rand = rand or random.random
        self.limit = limit
        state_dir = port.state_dir
        self.endpoints = [_Endpoint(self, h, state_dir) for h in context.config.webhooks]
        self._events = port.subscribe("credentials.*", buffer=65536)
        self.outcome_file = OutcomeFile(state_dir, self.name, self.outcomes)

    def close(self) -> None:
        self._events.close()

    def health(self) -> SinkHealth:
        """Events delivered, failed requests, events in the outboxes; each webhook's outcome."""
        return SinkHealth(
            self.name,
            delivered=sum(ep.delivered for ep in self.endpoints),
            failures=sum(ep.outcome.failures for ep in self.endpoints),
            pending=sum(len(ep.outbox) for ep in self.endpoints),
            outcomes=tuple(self.outcomes()),
        )

    def outcomes(self) -> list[Outcome]:
        now = self.clock()
        for ep in self.endpoints:
            ep.outcome.extra = {
                "delivered": ep.delivered,
                "pending": len(ep.outbox),
                "retrying": len(ep.retrying),
                "oldest_undelivered_seconds": round(ep.oldest_age(now), 3),
            }
        return [ep.outcome for ep in self.endpoints]

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        for ep in self.endpoints:
            await anyio.to_thread.run_sync(ep.outbox.load)
            for problem in ep.outbox.problems:
                log.warning("webhook outbox problem", extra={"problem": problem})
            lost = self._published_but_not_queued(ep)
            if lost:
                log.warning(
                    "webhook outbox: re-queueing the state of credentials whose last event "
                    "the previous run published but did not queue (a crash in between)",
                    extra={"webhook": ep.hook.name, "credentials": [e.subject for e in lost]},
                )
                await anyio.to_thread.run_sync(ep.outbox.add, lost, None)
        connector_limit = MAX_CONCURRENT
        async with self._events as events, anyio.create_task_group() as tg:
            try:
                for ep in self.endpoints:
                    ep.session = aiohttp.ClientSession(
                        connector=aiohttp.TCPConnector(limit=connector_limit),
                        auto_decompress=False,
                    )
                    ep.kick(tg)
                tg.start_soon(self.outcome_file.run, name="webhooks outcome file")
                task_status.started()
                while True:
                    batch = [await events.get()]
                    while (more := events.get_nowait()) is not None:
                        batch.append(more)
                    await self._intake(batch, tg)
            except anyio.EndOfStream:
                pass
            finally:
                tg.cancel_scope.cancel()
                with anyio.CancelScope(shield=True):
                    for ep in self.endpoints:
                        if ep.session is not None:
                            await ep.session.close()

    def _published_but_not_queued(self, ep: _Endpoint) -> list[Event]:
        """Events for states the last run persisted after its outbox last took one in.

        The engine records a state before publishing it; a SIGKILL between that and the
        outbox's write would lose the event. Each such credential's persisted state is sent
        again as the event of its status (a new id: it is a re-announcement). Nothing is
        done at a webhook's first start (no outbox yet): first-sight events come anyway.
        """
        if not ep.outbox.existed:
            return []
        hook, source, lost = ep.hook, self._port.source, []
        for name, state in self._port.loaded_states.items():
            event_type = _STATUS_EVENT.get(state.status.value)
            if (
                event_type is not None
                and state.sequence > ep.outbox.seen.get(name, 0)
                and matches(hook.credentials, name)
                and matches(hook.on, event_type)
            ):
                lost.append(make_event(
                    event_type, state, source=source, now=self.clock(), id=self._port.new_id()
                ))
        return sorted(lost, key=lambda e: e.sequence)

    async def _intake(self, batch: list[Event], tg: TaskGroup) -> None:
        for ep in self.endpoints:
            hook = ep.hook
            ours = [e for e in batch if matches(hook.credentials, e.subject)]
            mine = [e for e in ours if matches(hook.on, e.type)]
            seen = {e.subject: e.sequence for e in ours}
            if not mine and all(q <= ep.outbox.seen.get(n, 0) for n, q in seen.items()):
                continue
            try:
                async with ep.lock:
                    await anyio.to_thread.run_sync(ep.outbox.add, mine, seen)
            except OSError as exc:
                # Not durable, but still deliverable: losing persistence beats losing the event.
                log.error(
                    "webhook outbox write failed",
                    extra={"webhook": hook.name, "error": exc.strerror or str(exc)},
                )
            ep.kick(tg)
