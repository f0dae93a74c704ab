"""credbroker: tells every consumer, at once, that a credential changed or is about to expire.

The embedded API::

    from broker import Broker, load_config

    async with Broker(load_config("config/broker.toml")) as b:
        b.state("nebius")
        await b.check("nebius")
        async with b.subscribe("credentials.*", credential="nebius") as events:
            async for event in events: ...
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from broker.app import Broker
    from broker.config import Config, ConfigError, load_config
    from broker.core.events import Event
    from broker.core.state import FileInfo, Problem, State, Status
    from broker.engine.bus import Subscription
    from broker.port import Sink, SinkContext, SinkHealth

# Resolved on first use, so that `import broker.client` (a consumer service) loads neither
# the engine nor pydantic.
_WHERE = {
    "Broker": "broker.app",
    "Subscription": "broker.engine.bus",
    "Sink": "broker.port",
    "SinkContext": "broker.port",
    "SinkHealth": "broker.port",
    "Config": "broker.config",
    "ConfigError": "broker.config",
    "load_config": "broker.config",
    "Event": "broker.core.events",
    "FileInfo": "broker.core.state",
    "Problem": "broker.core.state",
    "State": "broker.core.state",
    "Status": "broker.core.state",
}

__all__ = [
    "Broker",
    "Config",
    "ConfigError",
    "Event",
    "FileInfo",
    "Problem",
    "Sink",
    "SinkContext",
    "SinkHealth",
    "State",
    "Status",
    "Subscription",
    "load_config",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'broker' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups do not come here
    return value
