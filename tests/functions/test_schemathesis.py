"""Property-based API tests: schemathesis against the app's own OpenAPI, with a valid token.

Runs against a real `serve` process on its own database. Every operation gets enough examples
for 500+ requests in all; no answer may be a 5xx and every documented response must match its
schema.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
import schemathesis
from cpa_scheduler import auth
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.conftest import Server
from tests.functions.conftest import ISSUER, SECRET, free_port

EXAMPLES_PER_OPERATION = 100  # operations without inputs stop early; >500 in all
CALLS: list[int] = []


@pytest.fixture(scope="module")
def served_api(pg_server: Server, template_db: str) -> Iterator[dict[str, str]]:
    name = f"cpa_st_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_server.admin("postgres"), autocommit=True) as conn:
        conn.execute(
            f'create database "{name}" template "{template_db}" owner "{pg_server.app_user}"'
        )
    url = pg_server.url(name)
    tenant, user = uuid.uuid4(), uuid.uuid4()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("insert into auth.users (id) values (%s)", (user,))
        conn.execute("insert into public.tenants (id, name) values (%s, 'st')", (tenant,))
        conn.execute(
            "insert into public.memberships (tenant_id, user_id) values (%s, %s)", (tenant, user)
        )
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "SUPABASE_JWT_SECRET": SECRET,
        "SUPABASE_URL": ISSUER.removesuffix("/auth/v1"),
        "CPA_RATE_LIMIT": "100000",
        # Long-polls (events, agent claims) answer within this bound, as behind Lambda.
        "CPA_EVENTS_BOUND": "0.5",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "cpa_scheduler.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield {"base": base, "token": auth.mint(SECRET, user, issuer=ISSUER)}
    finally:
        proc.terminate()
        proc.wait(30)
        with psycopg.connect(pg_server.admin("postgres"), autocommit=True) as conn:
            conn.execute(f'drop database if exists "{name}" with (force)')


@pytest.fixture(scope="module")
def api_schema(served_api: dict[str, str]) -> Any:
    return schemathesis.openapi.from_url(f"{served_api['base']}/openapi.json")


def test_no_5xx_and_responses_match_schema(api_schema: Any, served_api: dict[str, str]) -> None:
    headers = {"Authorization": f"Bearer {served_api['token']}"}
    operations = [result.ok() for result in api_schema.get_all_operations()]
    # 15 paths (with the A2A card and endpoint, GET /v1/agents); /v1/jobs and /v1/schedules
    # have GET and POST
    assert len(operations) == 19

    for operation in operations:

        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(case=operation.as_strategy())
        def check(case: Any) -> None:
            extra = {"Last-Event-ID": "0"} if case.path.endswith("/events") else {}
            response = case.call(
                base_url=served_api["base"], headers={**headers, **extra}, timeout=10
            )
            CALLS.append(response.status_code)
            case.validate_response(
                response, checks=[not_a_server_error, response_schema_conformance]
            )

        check()
    assert len(CALLS) >= 500, len(CALLS)
    assert any(200 <= c < 300 for c in CALLS)
