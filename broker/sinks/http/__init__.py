"""The HTTP API of SPEC section 5 (aiohttp), run as a sink inside the broker's task group.

:class:`HttpApi` (``server``) is the sink; the other modules are its parts, each named for
its job (see ``server``'s docstring for the routes and where each part lives).
"""

from broker.sinks.http.connections import AcceptErrorLog, connection_cap
from broker.sinks.http.errors import ApiError
from broker.sinks.http.middleware import accepted_hosts, host_name
from broker.sinks.http.replay import RING_SIZE, ReplayRing
from broker.sinks.http.routes import load_openapi
from broker.sinks.http.server import HttpApi
from broker.sinks.http.sse import SSE_BUFFER

__all__ = [
    "RING_SIZE",
    "SSE_BUFFER",
    "AcceptErrorLog",
    "ApiError",
    "HttpApi",
    "ReplayRing",
    "accepted_hosts",
    "connection_cap",
    "host_name",
    "load_openapi",
]
