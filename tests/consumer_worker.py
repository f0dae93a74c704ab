"""A worker process of a small synchronous server that follows a credbroker daemon.

Its "session" is ``functools.lru_cache``d and built from the token a CredentialCache holds;
``invalidates`` clears it on each new generation. ``GET /token`` answers which token the
session uses, as a digest (a test must never see the token itself in any output).
``GET /held`` answers which generation the cache holds and its counters, without loading.

``--fail-flag PATH`` makes the loader raise while that file exists, so the cache keeps (and
reports) the last good generation; ``--retry-delay``/``--retries`` set the cache's retry waits.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from broker.client import BrokerClient, CredentialCache, invalidates


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--token-file", required=True)
    parser.add_argument("--credential", default="svc")
    parser.add_argument("--prefix", default="credbroker")
    parser.add_argument("--consumer-id")
    parser.add_argument("--fail-flag", type=Path)
    parser.add_argument("--retry-delay", type=float)
    parser.add_argument("--retries", type=int, default=10)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)

    path = Path(args.token_file)
    flag: Path | None = args.fail_flag

    def load() -> str:
        if flag is not None and flag.exists():
            raise RuntimeError("the test holds this consumer's loader back")
        return path.read_text()

    options: dict[str, Any] = {}
    if args.retry_delay is not None:
        options["retry_delays"] = [args.retry_delay] * args.retries
    client = BrokerClient(args.url, prefix=args.prefix)
    cache = CredentialCache(load, credential=args.credential, client=client,
                            consumer_id=args.consumer_id, **options)
    builds = 0

    @invalidates(args.credential, client=client)
    @functools.lru_cache(maxsize=1)
    def session() -> dict[str, object]:
        nonlocal builds
        builds += 1
        token = cache.get()
        return {"digest": hashlib.sha256(token.encode()).hexdigest(), "length": len(token),
                "generation": cache.generation}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body: dict[str, object]
            if self.path == "/ready":
                body = {"ready": client.wait_ready(0)}
                status = 200 if body["ready"] else 503
            elif self.path == "/held":
                body = {"generation": cache.generation, "loads": cache.loads,
                        "failures": cache.failures, "reports": cache.reports}
                status = 200
            else:
                body = {**session(), "builds": builds, "gaps": client.gaps}
                status = 200
            raw = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, format: str, *args: object) -> None:
            pass

    follower = client.follow_in_thread()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    stopping = threading.Event()

    def stop(signum: int, frame: object) -> None:
        if not stopping.is_set():
            stopping.set()
            threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever(poll_interval=0.05)
    finally:
        cache.close()
        follower.stop()
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
