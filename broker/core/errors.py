"""``BrokerError``: the one base of every error credbroker raises on purpose.

Catch it to tell credbroker's own refusals (a bad config, an unusable state store, a report
the broker will not take) from bugs. Each subclass carries a message fit to show a user; none
ever holds credential bytes.
"""

from __future__ import annotations

__all__ = ["BrokerError"]


class BrokerError(Exception):
    """An error credbroker raises on purpose, with a message fit to show (never a secret)."""
