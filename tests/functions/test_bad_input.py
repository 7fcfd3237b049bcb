"""Bad input is a 4xx problem+json, never a 5xx or a traceback (issue 22, item 7)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import httpx
import pytest
import uvicorn
from cpa_scheduler import service
from cpa_scheduler.api import problems
from fastapi import FastAPI

from tests.conftest import MemberFactory
from tests.functions.conftest import bearer, free_port
from tests.functions.test_api import is_problem


@pytest.mark.parametrize(
    ("cron", "why"),
    [
        ("0 0 30 2 *", "no date matches"),
        ("0 0 31 4 *", "no date matches"),
        ("0 0 L * *", "'L' is not standard cron"),
        ("0 0 1W * *", "'1W' is not standard cron"),
        ("0 0 * * 1#2", "'1#2' is not standard cron"),
        ("٣ * * * *", "'٣' is not standard cron"),
        ("0 0 ? * *", "'?' is not standard cron"),
        ("0 0 * * * *", "6 fields"),
        ("@daily", "'0 0 * * *' for @daily"),
        ("61 * * * *", "out of range"),
    ],
)
async def test_impossible_and_nonstandard_crons_are_422_that_say_why(
    client: httpx.AsyncClient, member_factory: MemberFactory, cron: str, why: str
) -> None:
    m = await member_factory()
    body = {"cron": cron, "time_zone": "UTC", "request": "check my email"}
    problem = is_problem(await client.post("/v1/schedules", headers=bearer(m), json=body), 422)
    assert why in problem["detail"], problem


async def test_standard_crons_with_names_are_accepted(
    client: httpx.AsyncClient, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    for cron in ("0 0 29 2 *", "30 7 * * mon-fri", "0 9 1 JAN *", "*/15 8-18 * * 1-5"):
        body = {"cron": cron, "time_zone": "UTC", "request": "check my email"}
        r = await client.post("/v1/schedules", headers=bearer(m), json=body)
        assert r.status_code == 201, (cron, r.text)


@pytest.mark.parametrize("zone", ["localtime", "posixrules", "Factory", "right/UTC", "posix/UTC"])
async def test_only_iana_zones(
    client: httpx.AsyncClient, member_factory: MemberFactory, zone: str
) -> None:
    m = await member_factory()
    job = {"request": "check my email", "time_zone": zone}
    assert (
        zone
        in is_problem(await client.post("/v1/jobs", headers=bearer(m), json=job), 422)["detail"]
    )
    sched = {"cron": "0 8 * * *", "time_zone": zone, "request": "check my email"}
    is_problem(await client.post("/v1/schedules", headers=bearer(m), json=sched), 422)


@pytest.mark.parametrize("when", ["0001-01-01T00:00:00+00:00", "1969-07-20T20:17:00Z"])
async def test_a_todos_own_run_at_in_the_past_is_422_like_the_jobs(
    client: httpx.AsyncClient, member_factory: MemberFactory, when: str
) -> None:
    m = await member_factory()
    graph = {"todos": [{"key": "a", "action": "noop"},
                       {"key": "b", "action": "noop", "run_at": when}]}  # fmt: skip
    problem = is_problem(
        await client.post("/v1/jobs", headers=bearer(m), json={"graph": graph}), 422
    )
    assert "ToDo 'b'" in problem["detail"] and "past" in problem["detail"]
    assert problem["errors"][0]["loc"] == ["body", "graph", "todos", "1", "run_at"]
    job = is_problem(
        await client.post("/v1/jobs", headers=bearer(m), json={"request": "x", "run_at": when}), 422
    )
    assert "past" in job["detail"]


ROUTES = [
    ("POST", "/v1/jobs"),
    ("POST", "/v1/schedules"),
    ("POST", "/v1/messages"),
    ("POST", "/v1/agents/claim"),
    ("POST", "/v1/jobs/00000000-0000-0000-0000-000000000000/cancel"),
    ("GET", "/healthz"),
]


@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_deep_json_is_refused_before_parsing_on_every_route(
    client: httpx.AsyncClient,
    member_factory: MemberFactory,
    caplog: pytest.LogCaptureFixture,
    method: str,
    path: str,
) -> None:
    m = await member_factory()
    deep = b"[" * 100_000 + b"]" * 100_000
    for headers in (bearer(m), {}):  # also before authentication
        with caplog.at_level(logging.DEBUG):
            r = await client.request(
                method, path, content=deep, headers={**headers, "Content-Type": "application/json"}
            )
        problem = is_problem(r, 422)
        assert "deeper than 96" in problem["detail"]
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR or rec.exc_info]
    # Brackets inside strings do not count; a body just under the limit goes through.
    fine = {"request": "[" * 5000 + "{" * 5000}
    r = await client.post("/v1/jobs", json=fine, headers=bearer(m))
    assert r.status_code != 422 or "deeper" not in r.text


def test_nesting_scan() -> None:
    assert not problems.nesting_over(b'{"a": "[[[[[[\\"[[[[["}', 2)
    assert problems.nesting_over(b'{"a": [[[1]]]}', 3)
    assert not problems.nesting_over(b'{"a": [[[1]]]}', 4)
    assert problems.nesting_over(b"[" * 100_000, 96)


async def test_oversized_headers_get_problem_json(
    client: httpx.AsyncClient, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    big = {"Authorization": "Bearer " + "a" * 1_000_000}
    is_problem(await client.get("/v1/jobs", headers=big), 431, "headers_too_large")
    assert (await client.get("/v1/jobs", headers=bearer(m))).status_code == 200


async def test_oversized_headers_under_serves_uvicorn_config(
    app: FastAPI, wire: Callable[..., service.Services]
) -> None:
    """As `serve` configures uvicorn: a 1 MB Authorization reaches the API's own limit."""
    wire()
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off",
                       h11_max_incomplete_event_size=problems.H11_MAX_HEAD)
    )  # fmt: skip
    task = asyncio.create_task(server.serve())
    for _ in range(200):
        if server.started:
            break
        await asyncio.sleep(0.02)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
            r = await c.get("/v1/jobs", headers={"Authorization": "Bearer " + "a" * 1_000_000})
        is_problem(r, 431, "headers_too_large")
    finally:
        server.should_exit = True
        await task


async def test_405_names_the_allowed_methods(client: httpx.AsyncClient) -> None:
    r = await client.delete("/v1/jobs")
    problem = is_problem(r, 405, "method_not_allowed")
    assert set(r.headers["allow"].replace(" ", "").split(",")) == {"GET", "POST"}
    assert "GET" in problem["detail"]


async def test_unparsable_body_is_a_documented_400(
    client: httpx.AsyncClient, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    r = await client.post(
        "/v1/schedules", content=b'{"cron": "\xff"}',
        headers={**bearer(m), "Content-Type": "application/json"},
    )  # fmt: skip
    assert r.status_code in (400, 422)
    is_problem(r, r.status_code)
    spec = (await client.get("/openapi.json")).json()
    assert "400" in spec["paths"]["/v1/schedules"]["post"]["responses"]


async def test_tenant_header_is_a_uuid(
    client: httpx.AsyncClient, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    r = await client.get("/v1/jobs", headers={**bearer(m), "X-CPA-Tenant": "not-a-uuid"})
    is_problem(r, 422)
    spec = (await client.get("/openapi.json")).json()
    (param,) = [p for p in spec["paths"]["/v1/jobs"]["get"]["parameters"]
                if p["name"].lower() == "x-cpa-tenant"]  # fmt: skip
    assert "uuid" in str(param["schema"])
