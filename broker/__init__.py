"""credbroker: tells every consumer, at once, that a credential changed or is about to expire.

The embedded API::

    from broker import Broker, load_config

    async with Broker(load_config("config/broker.toml")) as b:
        b.state("nebius")
        await b.check("nebius")
        async with b.subscribe("credentials.*", credential="nebius") as events:
            async for event in events: ...
"""

from broker.app import Broker
from broker.bus import Subscription
from broker.config import Config, ConfigError, load_config
from broker.events import Event
from broker.state import FileInfo, Problem, State, Status

__all__ = [
    "Broker",
    "Config",
    "ConfigError",
    "Event",
    "FileInfo",
    "Problem",
    "State",
    "Status",
    "Subscription",
    "load_config",
]
