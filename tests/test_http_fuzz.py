"""Schemathesis over the OpenAPI document, against the real server: no 5xx, ever.

Schemathesis generates requests for every operation of ``broker/openapi.json`` (valid ones
and ones that break the schema) and runs its checks on each real answer: not a server
error, status code and content type documented, body matching the documented schema,
schema-violating input rejected, auth not ignored, undocumented methods answered 405.

It runs in a worker thread (schemathesis and hypothesis are synchronous and use
``requests``) while the broker serves from this test's event loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from tests.conftest import SecretRegistry, write_atomic
from tests.test_http import OPENAPI, cred, serving

pytestmark = pytest.mark.anyio

EXAMPLES = 250
#: The event stream never ends: schemathesis reads it for this long, then judges what came.
STREAM_SECONDS = 0.3
REQUEST_SECONDS = 10.0


async def test_schemathesis_finds_no_server_error_and_no_deviation(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry
) -> None:
    a, b = tmp_path / "svc", tmp_path / "db"
    write_atomic(a, secrets.token())
    write_atomic(b, secrets.token())
    token = secrets.token("bearer")
    token_file = tmp_path / "http-token"
    write_atomic(token_file, token)
    schema = schemathesis.openapi.from_dict(OPENAPI)
    strategy = st.one_of(
        schema.as_strategy(generation_mode=GenerationMode.POSITIVE),
        schema.as_strategy(generation_mode=GenerationMode.NEGATIVE),
        # The consumer routes answer most bad input with 404/409: keep refusals (400) of
        # the other routes as likely as before they came.
        schema.exclude(path_regex="/consumers/").as_strategy(
            generation_mode=GenerationMode.NEGATIVE),
        # Random names are almost never configured ones: also aim at a real credential,
        # on every route that takes one, and on the two that answer its state.
        schema.as_strategy(generation_mode=GenerationMode.POSITIVE,
                           path_parameters={"name": "svc"}),
        schema.include(path_regex=r"^/v1/credentials/\{name\}(/check)?$").as_strategy(
            generation_mode=GenerationMode.POSITIVE, path_parameters={"name": "svc"}),
        # The routes without a path parameter get few of the draws above: aim at them too,
        # so that every operation is reached whatever hypothesis's version draws.
        schema.exclude(path_regex=r"\{").as_strategy(generation_mode=GenerationMode.POSITIVE),
    )
    auth = {"Authorization": f"Bearer {token}"}
    answered: dict[tuple[str, str, int], int] = {}

    async with serving(harness_factory, [cred("svc", a), cred("db", b)], secrets,
                       token_file=str(token_file)) as (_h, api, _client):
        base = api.url or ""

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,  # the same requests on every run: CI stays reproducible
            suppress_health_check=list(HealthCheck),
        )
        @given(case=strategy)
        def exercise(case: schemathesis.Case) -> None:
            streaming = case.operation.path == "/v1/events"
            timeout = STREAM_SECONDS if streaming else REQUEST_SECONDS
            with requests.Session() as session:
                response = case.call(base_url=base, headers=auth, session=session,
                                     timeout=timeout)
                secrets.observe(f"fuzz {case.method} {case.formatted_path}", response.content)
                key = (case.method, case.operation.path, response.status_code)
                answered[key] = answered.get(key, 0) + 1
                assert response.status_code < 500, response.content[:300]
                case.validate_response(
                    response,
                    headers=auth,
                    transport_kwargs={"base_url": base, "headers": auth, "session": session,
                                      "timeout": timeout},
                )

        await anyio.to_thread.run_sync(exercise)

    # It really reached every operation, with successes and refusals.
    operations = {(m, p) for m, p, _ in answered}
    assert len(operations) == sum(
        1 for item in OPENAPI["paths"].values() for m in item
        if m in ("get", "post", "put", "delete")
    ), answered
    statuses = {s for _, _, s in answered}
    assert {200, 400, 401, 404} <= statuses, answered
    assert answered.get(("GET", "/v1/credentials/{name}", 200)), answered
    assert answered.get(("POST", "/v1/credentials/{name}/check", 200)), answered
    print("schemathesis answers:", dict(sorted(answered.items())))
