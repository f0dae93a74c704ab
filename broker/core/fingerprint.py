"""Keyed fingerprints: identify credential content without revealing it."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

PREFIX = "hmac-sha256:"


class Fingerprinter:
    """HMAC-SHA256 over every file of a credential, printed as ``hmac-sha256:<16 hex>``.

    Keyed, so a fingerprint published on MQTT cannot be brute-forced back to a short
    token by anyone who lacks the key file.
    """

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("fingerprint key must be at least 16 bytes")
        self._key = key

    def __repr__(self) -> str:
        return "Fingerprinter(key=<hidden>)"

    def fingerprint(self, parts: Iterable[tuple[str, bytes | None]]) -> str:
        """Fingerprint ``(role, content)`` pairs in order; ``None`` content marks an absent file."""
        mac = hmac.new(self._key, digestmod=hashlib.sha256)
        for role, content in parts:
            # Length-prefix every field so that no two different file sets hash alike.
            encoded_role = role.encode()
            mac.update(len(encoded_role).to_bytes(4, "big") + encoded_role)
            if content is None:
                mac.update(b"\xff" * 8)
            else:
                mac.update(len(content).to_bytes(8, "big"))
                mac.update(content)
        return PREFIX + mac.hexdigest()[:16]
