"""The consumer client: what a service that is not the broker imports (SPEC section 8).

::

    from broker.client import BrokerClient, CredentialCache, invalidates

    client = BrokerClient("http://127.0.0.1:8790")     # or "unix:/run/credbroker.sock", "mqtt://..."
    cache = CredentialCache(load_token, credential="nebius", client=client, consumer_id="api-1")

    @invalidates("nebius", client=client)          # cleared once per new generation
    @functools.lru_cache
    def nebius_session(): return make_session(cache.get())

    client.follow_in_thread()          # sync services; `async with client:` in async ones

It imports neither the engine, the configuration nor pydantic (an import contract checks it),
and an MQTT library only for ``mqtt://`` URLs. ``docs/consumers.md`` has recipes.
"""

from __future__ import annotations

from .broker_client import BrokerClient, EventStream
from .cache import CredentialCache, GenerationGate, invalidates
from .follower import Follower

__all__ = [
    "BrokerClient",
    "CredentialCache",
    "EventStream",
    "Follower",
    "GenerationGate",
    "invalidates",
]
