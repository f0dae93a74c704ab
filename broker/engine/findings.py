"""Findings about a credential from outside its files: a validator's verdict, a failing
refresh, the watcher's noisy-directory note. Each finder (``source``) has one slot per
credential; a finding tied to one version of the content goes when the content changes."""

from __future__ import annotations

from dataclasses import replace

from broker.config import CredentialSettings
from broker.core.machine import Observation
from broker.core.state import Problem, Status

__all__ = ["Findings"]


class Findings:
    """name -> source -> (fingerprint the finding is about, or ``None``: any content; problem)."""

    def __init__(self) -> None:
        self._slots: dict[str, dict[str, tuple[str | None, Problem]]] = {}

    def put(
        self, name: str, source: str, problem: Problem | None, *, fingerprint: str | None = None
    ) -> None:
        """Set (``problem``) or clear (``None``) ``source``'s finding about ``name``."""
        slots = self._slots.setdefault(name, {})
        if problem is None:
            slots.pop(source, None)
        else:
            slots[source] = (fingerprint, problem)

    def about(self, name: str, spec: CredentialSettings, obs: Observation) -> list[Problem]:
        """The findings that apply to what ``obs`` saw, with their remedies; the findings
        about content that is gone are dropped for good."""
        slots = self._slots.get(name)
        if not slots or obs.outcome is Status.MISSING:
            return []
        for source, (fingerprint, _) in list(slots.items()):
            if fingerprint is not None and fingerprint != obs.fingerprint:
                del slots[source]  # about content that is gone
        return [
            p if p.remedy else replace(p, remedy=spec.remedy(p.code, spec.expiry_file))
            for _, p in slots.values()
        ]
