"""No request waits on a dead connection (issue 22, item 3): with the network to the database
black-holed (packets dropped, no reset: tests/proxy.py ``blackhole``), every API route answers
503 problem+json within CPA_DB_TIMEOUT plus a small margin, ``/readyz`` within 3 s, and the
dispatcher notices and recovers as it does for a refused connection."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from cpa_scheduler import api, auth, dispatch, service, settings, store

from tests import proxy as proxy_mod
from tests.conftest import JobFactory, MemberFactory
from tests.functions.conftest import ISSUER, SECRET, bearer
from tests.integration.test_faults import _wait_done

DB_TIMEOUT = 2.0
MARGIN = 1.5  # the bound's small margin, with slack for a loaded machine


@pytest.fixture
async def proxied(db_url: str) -> AsyncIterator[tuple[proxy_mod.Proxy, store.Store]]:
    proxy, url = await proxy_mod.start_for(db_url)
    db = store.Store(url, max_size=6, timeout=DB_TIMEOUT)
    await db.open()
    try:
        yield proxy, db
    finally:
        proxy.up()
        await db.close()
        await proxy.stop()


def _app(db: store.Store, d: dispatch.Dispatcher | None = None) -> Any:
    config = settings.Settings(
        database_url="postgresql://unused", supabase_jwt_secret=SECRET, db_timeout=DB_TIMEOUT
    )
    verifier = auth.Verifier(hs256_secret=SECRET, jwks_url=None, issuer=ISSUER)
    services = service.Services(config, db, verifier=verifier)
    return api.create_app(services, dispatcher=None if d is None else d.health)


async def test_every_route_answers_503_in_time_while_the_database_is_black_holed(
    proxied: tuple[proxy_mod.Proxy, store.Store],
    member_factory: MemberFactory,
    job_factory: JobFactory,
) -> None:
    proxy, pdb = proxied
    m = await member_factory()
    job = await job_factory(m, [{"key": "a", "action": "noop"}])
    h = bearer(m)
    j = f"/v1/jobs/{job.id}"
    routes: list[tuple[str, str, dict[str, Any] | None]] = [
        ("GET", "/v1/jobs", None),
        ("GET", j, None),
        ("POST", "/v1/jobs", {"graph": {"todos": [{"key": "x", "action": "noop"}]}}),
        ("POST", f"{j}/cancel", None),
        ("POST", f"{j}/retry", None),
        ("GET", f"{j}/events?after=0&wait=0", None),
        ("GET", f"{j}/events", None),
        ("POST", "/v1/agents/claim", {"agent_id": "laptop", "actions": ["desktop.open_app"]}),
        ("GET", "/v1/schedules", None),
        ("POST", "/v1/schedules", {"cron": "0 8 * * *", "time_zone": "UTC", "request": "hi"}),
    ]
    transport = httpx.ASGITransport(app=_app(pdb))
    async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as c:
        for _ in range(3):  # warm: the pool holds open connections into the black hole
            assert (await c.get("/v1/jobs", headers=h)).status_code == 200
        proxy.blackhole()
        took: dict[str, float] = {}

        async def ask(method: str, url: str, body: dict[str, Any] | None) -> None:
            started = time.monotonic()
            r = await c.request(method, url, headers=h, json=body)
            took[f"{method} {url}"] = max(
                took.get(f"{method} {url}", 0), time.monotonic() - started
            )
            assert r.status_code == 503, (method, url, r.status_code, r.text)
            assert r.headers["content-type"].startswith("application/problem+json")
            assert "Retry-After" in r.headers

        # All at once, twice: the pooled connections (open into the black hole), the wait for
        # a connection of a full pool, then new connections that never get an answer.
        for _ in range(2):
            await asyncio.gather(*(ask(*route) for route in routes))
        started = time.monotonic()
        ready = await c.get("/readyz")
        readyz = time.monotonic() - started
        assert ready.status_code == 503 and ready.json()["database"] == "unavailable"
        assert readyz < 3.0, readyz
        assert max(took.values()) < DB_TIMEOUT + MARGIN, took

        proxy.up()
        for _ in range(100):  # back within seconds
            r = await c.get("/v1/jobs", headers=h)
            if r.status_code == 200:
                break
            await asyncio.sleep(0.1)
        assert r.status_code == 200
    print(f"\nblack-holed database: slowest answer {max(took.values()):.2f} s "
          f"(CPA_DB_TIMEOUT {DB_TIMEOUT:g} s), /readyz {readyz:.2f} s")  # fmt: skip


async def test_the_dispatcher_notices_a_black_hole_and_recovers(
    db: store.Store,
    db_url: str,
    proxied: tuple[proxy_mod.Proxy, store.Store],
    member_factory: MemberFactory,
    job_factory: JobFactory,
) -> None:
    proxy, pdb = proxied
    m = await member_factory()
    d = dispatch.Dispatcher(pdb, concurrency=4)
    stop = asyncio.Event()
    worker = asyncio.create_task(d.run_forever(proxy.url(db_url), stop=stop, sweep_interval=0.2))
    try:
        first = await job_factory(m, [{"key": "a", "action": "noop"}])
        assert await _wait_done(db, m, first.id, 10) == "done"
        proxy.blackhole()
        for _ in range(300):  # noticed: the loop reports the fault
            if d.health.snapshot()["status"] == "failing":
                break
            await asyncio.sleep(0.1)
        snap = d.health.snapshot()
        assert snap["status"] == "failing", snap
        assert not worker.done()
        job = await job_factory(m, [{"key": "a", "action": "noop"}])
        proxy.up()
        started = time.monotonic()
        assert await _wait_done(db, m, job.id, 20) == "done"
        print(f"\nblack hole: the dispatcher ran again {time.monotonic() - started:.2f} s "
              "after the network came back")  # fmt: skip
    finally:
        stop.set()
        await asyncio.wait_for(worker, 30)
