"""The per-credential state machine: (previous state, observation, now) -> (state, events).

Pure: no I/O, no clock, no config. It is fed plain data: the reads of a credential's files
(:class:`~broker.core.reads.FileRead`), the rules to judge them by
(:class:`~broker.core.rules.CredentialRules`) and the time; it answers with the events to
publish, still without sequence numbers (the engine owns that counter).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

# The event types are spelled in broker.core.events; re-exported for the callers that still
# take them from here.
from broker.core.events import EVENT_TYPES as EVENT_TYPES
from broker.core.events import EXPIRED as EXPIRED
from broker.core.events import EXPIRING as EXPIRING
from broker.core.events import INVALID as INVALID
from broker.core.events import MISSING as MISSING
from broker.core.events import REFRESH_FAILED as REFRESH_FAILED
from broker.core.events import REFRESHED as REFRESHED
from broker.core.expiry import Lifetime, expiring_at, read_lifetime
from broker.core.fingerprint import Fingerprinter
from broker.core.formats import ContentError, apply_selector, check_format, check_key_pair
from broker.core.globs import is_glob
from broker.core.problems import MISSING_CODES, ProblemCode
from broker.core.problems import REJECTING_CODES as REJECTING_CODES
from broker.core.reads import FileRead
from broker.core.rules import CredentialRules
from broker.core.state import Problem, Stage, State, Status

_STAGE_CODES = frozenset({ProblemCode.EXPIRING, ProblemCode.EXPIRED})
_CONTENT_OK = frozenset({Status.VALID, Status.EXPIRING, Status.EXPIRED})


@dataclass(frozen=True, slots=True)
class Observation:
    """What a read of every file of a credential says, content already reduced to a fingerprint."""

    files: tuple[FileRead, ...]
    outcome: Status  # VALID (content usable), INVALID or MISSING
    fingerprint: str | None
    problems: tuple[Problem, ...]
    lifetime: Lifetime | None = None
    note: str | None = None  # added to the reason of a new state (e.g. "using the fallback")


@dataclass(frozen=True, slots=True)
class Transition:
    """The state after an observation or a tick, and the events it causes, in order."""

    state: State
    events: tuple[tuple[str, State], ...] = ()


def observe(
    spec: CredentialRules,
    reads: Sequence[FileRead],
    fp: Fingerprinter,
    *,
    note: str | None = None,
) -> Observation:
    """Reduce the reads of a credential's files to an outcome, a fingerprint and problems.

    In order: a file that is not there makes the credential missing; ``select`` cuts each
    expiry-file read down to its part (a section that is not there: missing); the fingerprint
    covers what is left; then format, expiry (``spec.expiry_sources`` in turn, the soonest
    among a pattern role's files) and the ``key_file`` pair check, any failure invalid.
    ``note`` says which files are in use, for the state's reason.
    """
    # A broker fault (out of descriptors) is the engine's to retry; a one-shot reader such
    # as `credbroker check` has nothing better to say than "cannot read it now".
    reads = tuple(
        r if r.fault is None else replace(r, problem=Problem(ProblemCode.FILE_UNREADABLE, r.fault))
        for r in reads
    )
    missing = [
        (r.info.role, r.problem)
        for r in reads
        if r.problem is not None and r.problem.code in MISSING_CODES
    ]
    if missing:
        return Observation(reads, Status.MISSING, None, _with_remedies(spec, missing), note=note)

    # The selected bytes live only in this call, like the content they come from.
    contents: list[bytes | None] = []
    invalid: list[tuple[str, Problem]] = []
    for r in reads:
        data = r.content
        if data is not None and spec.select is not None and r.info.role == spec.expiry_file:
            try:
                data = apply_selector(spec.select, data)
            except ContentError as exc:
                problem = (r.info.role, _content_problem(r, exc))
                if exc.code in MISSING_CODES:
                    problems = _with_remedies(spec, [problem])
                    return Observation(reads, Status.MISSING, None, problems, note=note)
                invalid.append(problem)
        contents.append(data)

    fingerprint = fp.fingerprint(
        (_fingerprint_label(spec, r), _fingerprint_input(r, data))
        for r, data in zip(reads, contents, strict=True)
    )
    invalid = [*((r.info.role, r.problem) for r in reads if r.problem is not None), *invalid]
    lifetime: Lifetime | None = None
    if not invalid:
        expiry_reads: list[tuple[FileRead, bytes]] = []
        for r, data in zip(reads, contents, strict=True):
            content = data or b""
            try:
                if r.info.role == spec.expiry_file:
                    check_format(spec.format, content)
                    expiry_reads.append((r, content))
                elif not content.strip():
                    raise ContentError(ProblemCode.EMPTY, "file is empty")
            except ContentError as exc:
                invalid.append((r.info.role, _content_problem(r, exc)))
        if not invalid:
            try:
                lifetime = _lifetime(spec, expiry_reads)
            except _ReadError as exc:
                invalid.append((exc.read.info.role, _content_problem(exc.read, exc.error)))
        if not invalid and spec.key_file is not None:
            invalid.extend(_key_pair_problems(spec, reads, contents, expiry_reads))
    private = spec.private_roles
    warnings = [
        (r.info.role, _insecure(r))
        for r in reads
        if (private is None or r.info.role in private) and _is_insecure(r)
    ]
    if spec.strict_permissions:
        invalid, warnings = [*invalid, *warnings], []
    if invalid:
        problems = _with_remedies(spec, [*invalid, *warnings])
        return Observation(reads, Status.INVALID, fingerprint, problems, note=note)
    return Observation(
        reads, Status.VALID, fingerprint, _with_remedies(spec, warnings), lifetime, note
    )


class _ReadError(Exception):
    def __init__(self, read: FileRead, error: ContentError) -> None:
        super().__init__(error.message)
        self.read = read
        self.error = error


def _lifetime(
    spec: CredentialRules, expiry_reads: Sequence[tuple[FileRead, bytes]]
) -> Lifetime | None:
    """The lifetime from the first source that finds one.

    A source that finds no field in any file (``no-expiry``) hands over to the next. Among
    the files of a pattern role, the soonest expiry wins: the credential is only as good as
    its soonest-expiring piece (an AWS SSO cache holds tokens that live hours next to client
    registrations that live 90 days; the token is what runs out).
    """
    if not expiry_reads:
        return None
    last: _ReadError | None = None
    for source in spec.expiry_sources:
        found: list[Lifetime] = []
        for read, content in expiry_reads:
            try:
                found.append(read_lifetime(source, content, read.info.mtime or 0.0))
            except ContentError as exc:
                if exc.code != ProblemCode.NO_EXPIRY:
                    raise _ReadError(read, exc) from None
                last = _ReadError(read, exc)
        if found:
            return min(found, key=lambda lt: math.inf if lt.expires_at is None else lt.expires_at)
    assert last is not None  # every source found nothing, in at least one file
    raise last


def _key_pair_problems(
    spec: CredentialRules,
    reads: Sequence[FileRead],
    contents: Sequence[bytes | None],
    expiry_reads: Sequence[tuple[FileRead, bytes]],
) -> list[tuple[str, Problem]]:
    keys = [
        (r, data) for r, data in zip(reads, contents, strict=True) if r.info.role == spec.key_file
    ]
    if not keys or not expiry_reads:
        return []
    (key_read, key), (cert_read, cert) = keys[0], expiry_reads[0]
    try:
        check_key_pair(cert, key or b"")
    except ContentError as exc:
        message = (
            f"{key_read.info.role} file {key_read.info.path} and {cert_read.info.role} file "
            f"{cert_read.info.path}: {exc.message}"
        )
        return [(key_read.info.role, Problem(exc.code, message))]
    return []


def _content_problem(read: FileRead, exc: ContentError) -> Problem:
    return Problem(exc.code, f"{read.info.role} file {read.info.path}: {exc.message}")


def transition(
    spec: CredentialRules,
    prev: State | None,
    obs: Observation,
    now: float,
    *,
    startup: bool = False,
    settings_changed: bool = False,
) -> Transition:
    """Apply an observation.

    ``startup`` marks the first read after the broker started; ``settings_changed`` a read
    after the credential's settings changed (config reload), which re-derives the lifetime
    of unchanged content.
    """
    files = tuple(r.info for r in obs.files)
    if obs.outcome is Status.MISSING:
        base = prev or State(spec.name, Status.MISSING)
        state = replace(base, status=Status.MISSING, files=files, problems=obs.problems)
        if prev is not None and prev.status is Status.MISSING:
            return Transition(replace(state, reason=prev.reason))
        state = replace(state, changed_at=now, reason=_noted(obs.problems[0].message, obs))
        return Transition(state, ((MISSING, state),))

    generation = prev.generation if prev is not None else 0
    changed = prev is None or prev.fingerprint != obs.fingerprint
    if changed:
        generation += 1

    if obs.outcome is Status.INVALID:
        state = State(
            credential=spec.name,
            status=Status.INVALID,
            generation=generation,
            sequence=prev.sequence if prev else 0,
            fingerprint=obs.fingerprint,
            changed_at=prev.changed_at if prev else None,
            files=files,
            problems=obs.problems,
            reason=_noted(obs.problems[0].message, obs),
        )
        if not changed and prev is not None and prev.status is Status.INVALID:
            return Transition(replace(state, reason=prev.reason))
        state = replace(state, changed_at=now)
        return Transition(state, ((INVALID, state),))

    lifetime = obs.lifetime or Lifetime(None, None)
    expiring = expiring_at(lifetime, spec.expiring_before, spec.expiring_fraction)
    if not changed and prev is not None and prev.status in _CONTENT_OK:
        # Same bytes: keep the lifetime found when they first appeared, so `touch` on a
        # ttl-based file neither renews nor reschedules anything -- unless the settings
        # that derive it changed.
        quiet = replace(prev, files=files, problems=_stage_problems(spec, obs.problems, prev.stage))
        if settings_changed:
            quiet = replace(
                quiet,
                expires_at=lifetime.expires_at,
                expiring_at=expiring,
                issued_at=lifetime.issued_at,
            )
        return tick(spec, quiet, now)

    stage = _stage_at(lifetime.expires_at, expiring, now)
    if prev is None:
        reason = "first seen"
    elif not changed:
        reason = f"restored after {prev.status.value}"
    elif startup:
        reason = "content changed while the broker was stopped"
    else:
        reason = "content changed"
    reason = _noted(reason, obs)
    state = State(
        credential=spec.name,
        status=stage.status,
        generation=generation,
        sequence=prev.sequence if prev else 0,
        fingerprint=obs.fingerprint,
        expires_at=lifetime.expires_at,
        expiring_at=expiring,
        changed_at=now,
        files=files,
        problems=_stage_problems(spec, obs.problems, stage),
        reason=reason,
        issued_at=lifetime.issued_at,
        stage=stage,
    )
    events: list[tuple[str, State]] = [(REFRESHED, state)]
    if stage is not Stage.VALID:
        events.append((_STAGE_EVENT[stage], replace(state, reason=_stage_reason(stage))))
    return Transition(state, tuple(events))


def apply_findings(obs: Observation, findings: Iterable[Problem]) -> Observation:
    """Add findings from outside the files (validator, refresh runner) to an observation.

    A rejecting finding makes usable content invalid; other findings are only reported.
    """
    found = list(findings)
    if not found or obs.outcome is Status.MISSING:
        return obs
    rejected = [p for p in found if p.code in REJECTING_CODES]
    others = [p for p in found if p.code not in REJECTING_CODES]
    if rejected and obs.outcome is Status.VALID:
        return replace(
            obs,
            outcome=Status.INVALID,
            problems=(*rejected, *obs.problems, *others),
            lifetime=None,
        )
    return replace(obs, problems=(*obs.problems, *rejected, *others))


def tick(spec: CredentialRules, state: State, now: float) -> Transition:
    """Move a credential along its lifetime as time passes; each stage is announced once."""
    if state.status not in _CONTENT_OK:
        return Transition(state)
    stage = _stage_at(state.expires_at, state.expiring_at, now)
    if stage <= state.stage:
        return Transition(state)
    new = replace(
        state,
        status=stage.status,
        stage=stage,
        changed_at=now,
        problems=_stage_problems(spec, state.problems, stage),
        reason=_stage_reason(stage),
    )
    return Transition(new, ((_STAGE_EVENT[stage], new),))


def next_deadline(state: State) -> float | None:
    """When ``tick`` may next have something to say about this credential."""
    if state.status not in _CONTENT_OK:
        return None
    if state.stage < Stage.EXPIRING and state.expiring_at is not None:
        return state.expiring_at
    if state.stage < Stage.EXPIRED and state.expires_at is not None:
        return state.expires_at
    return None


_STAGE_EVENT = {Stage.EXPIRING: EXPIRING, Stage.EXPIRED: EXPIRED}


def _stage_at(expires_at: float | None, expiring: float | None, now: float) -> Stage:
    if expires_at is not None and now >= expires_at:
        return Stage.EXPIRED
    if expiring is not None and now >= expiring:
        return Stage.EXPIRING
    return Stage.VALID


def _noted(reason: str, obs: Observation) -> str:
    return f"{reason}; {obs.note}" if obs.note else reason


def _stage_reason(stage: Stage) -> str:
    return "expired" if stage is Stage.EXPIRED else "inside the expiring window"


def _stage_problems(
    spec: CredentialRules, problems: tuple[Problem, ...], stage: Stage
) -> tuple[Problem, ...]:
    kept = tuple(p for p in problems if p.code not in _STAGE_CODES)
    if stage is Stage.VALID:
        return kept
    code = ProblemCode.EXPIRED if stage is Stage.EXPIRED else ProblemCode.EXPIRING
    message = (
        "the credential has expired" if stage is Stage.EXPIRED else "the credential expires soon"
    )
    return (Problem(code, message, spec.remedy(code, spec.expiry_file)), *kept)


def _fingerprint_label(spec: CredentialRules, read: FileRead) -> str:
    """The role; for a pattern role's file, also its name (a rename is a change too)."""
    path = spec.files.get(read.info.role)
    if path is not None and is_glob(path) and read.info.present:
        return f"{read.info.role}/{os.path.basename(read.info.path)}"
    return read.info.role


def _fingerprint_input(read: FileRead, content: bytes | None) -> bytes | None:
    if content is not None:
        return content
    if read.signature is not None and read.problem is not None:
        # Unread (too large, not a file): identify the version by its inode metadata, so that
        # a different oversized file still counts as a change.
        return f"{read.problem.code}:{read.signature}".encode()
    return None


def _is_insecure(read: FileRead) -> bool:
    mode = read.info.mode
    return read.info.present and mode is not None and bool(mode & 0o077)


def _insecure(read: FileRead) -> Problem:
    mode = read.info.mode or 0
    return Problem(
        ProblemCode.INSECURE_PERMISSIONS,
        f"{read.info.path} is accessible by group or others (mode {mode:04o})",
    )


def _with_remedies(
    spec: CredentialRules, problems: Sequence[tuple[str, Problem]]
) -> tuple[Problem, ...]:
    return tuple(
        p if p.remedy else replace(p, remedy=spec.remedy(p.code, role)) for role, p in problems
    )
