"""Faults: the dispatcher survives dropped connections and unstorable results; requests get a
fast 503 while the database is down. The database sits behind a TCP proxy that can drop every
connection or stop answering (tests/proxy.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from cpa_scheduler import api, dispatch, errors, executor, lane, report, service, settings, store

from tests import proxy as proxy_mod
from tests.conftest import JobFactory, Member, MemberFactory, register_action
from tests.integration.test_dispatch_safety import done_events_per_todo, job_state


@pytest.fixture
async def proxied(db_url: str) -> AsyncIterator[tuple[proxy_mod.Proxy, store.Store]]:
    proxy, url = await proxy_mod.start_for(db_url)
    db = store.Store(url, max_size=6, timeout=2.0)
    await db.open()
    try:
        yield proxy, db
    finally:
        proxy.up()
        await db.close()
        await proxy.stop()


async def _wait_done(db: store.Store, m: Member, job_id: Any, limit: float) -> str:
    deadline = time.monotonic() + limit
    status = ""
    while time.monotonic() < deadline:
        status, _ = await job_state(db, m, job_id)
        if status in ("done", "failed", "cancelled"):
            return status
        await asyncio.sleep(0.1)
    return status


async def test_connections_terminated_twice_during_a_200_todo_job(
    db: store.Store,
    db_url: str,
    proxied: tuple[proxy_mod.Proxy, store.Store],
    member_factory: MemberFactory,
    job_factory: JobFactory,
) -> None:
    proxy, pdb = proxied
    m = await member_factory()
    todos = [{"key": f"t{i}", "action": "noop", "params": {"duration_ms": 50}} for i in range(200)]
    job = await job_factory(m, todos)
    d = dispatch.Dispatcher(pdb, concurrency=16, lease_seconds=30)
    app = api.create_app(service.Services(settings.Settings(), pdb), dispatcher=d.health)
    transport = httpx.ASGITransport(app=app)
    stop = asyncio.Event()
    worker = asyncio.create_task(d.run_forever(proxy.url(db_url), stop=stop, sweep_interval=0.2))
    try:
        recoveries = []
        for _ in range(2):
            await asyncio.sleep(0.25)
            cut = time.monotonic()
            proxy.cut()
            for _ in range(200):  # until the loop has seen the fault, then answers again
                await asyncio.sleep(0.02)
                if d.health.last_ok is not None and d.health.last_ok > cut:
                    break
            recoveries.append(time.monotonic() - cut)
        assert await _wait_done(db, m, job.id, 30) == "done"
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            for _ in range(100):
                answer = await c.get("/readyz")
                if answer.status_code == 200:
                    break
                await asyncio.sleep(0.05)
        assert answer.json()["dispatcher"]["status"] == "ready", answer.text
        assert max(recoveries) < 5, recoveries
        print(f"\nrecovery after a connection cut: {[round(r, 3) for r in recoveries]} s")
    finally:
        stop.set()
        await asyncio.wait_for(worker, 30)
    assert not worker.exception()
    per_todo = await done_events_per_todo(db_url, job.id)
    assert len(per_todo) == 200 and set(per_todo.values()) == {1}


async def test_a_request_while_the_database_is_down_gets_a_503_within_two_seconds(
    proxied: tuple[proxy_mod.Proxy, store.Store],
) -> None:
    proxy, pdb = proxied
    proxy.down()
    for _ in range(2):  # a dropped pooled connection, then a connect that never answers
        started = time.monotonic()
        with pytest.raises(errors.UnavailableError):
            async with pdb.service() as s:
                await s.todo_claim(target="cloud", owner="x", limit=1)
        took = time.monotonic() - started
        assert took < 3.0, took  # CPA_DB_TIMEOUT is 2 s; slack for a loaded machine
    proxy.up()
    for _ in range(50):
        if await pdb.ping():
            break
        await asyncio.sleep(0.1)
    assert await pdb.ping()


async def test_the_dispatcher_backs_off_while_down_and_runs_after(
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
    proxy.refuse()
    worker = asyncio.create_task(d.run_forever(proxy.url(db_url), stop=stop, sweep_interval=0.2))
    try:
        await asyncio.sleep(3.0)
        assert not worker.done()
        snap = d.health.snapshot()
        assert snap["status"] == "failing" and snap["failures"] >= 2, snap
        assert "unavailable" in (snap["last_error"] or "")
        job = await job_factory(m, [{"key": "a", "action": "noop"}])
        proxy.up()
        assert await _wait_done(db, m, job.id, 15) == "done"
    finally:
        stop.set()
        await asyncio.wait_for(worker, 15)


async def test_a_worker_that_cannot_recover_gives_up(
    db_url: str, proxied: tuple[proxy_mod.Proxy, store.Store]
) -> None:
    proxy, pdb = proxied
    proxy.refuse()
    d = dispatch.Dispatcher(pdb)
    started = time.monotonic()
    with pytest.raises(errors.UnavailableError, match="could not reach the database"):
        await asyncio.wait_for(
            d.run_forever(proxy.url(db_url), stop=asyncio.Event(), max_down=1.0), 20
        )
    assert time.monotonic() - started < 15


async def test_an_unstorable_result_fails_its_todo_alone(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    await register_action(db, "echo")

    async def echo(params: dict[str, Any], ctx: executor.Context) -> executor.Outcome:
        await asyncio.sleep(0.01)
        if ctx.key == "t13":
            return executor.Done({"a": "\ud800"})
        if ctx.key == "t42":
            value: Any = 1
            for _ in range(300):
                value = [value]
            return executor.Done(value)
        return executor.Done({"ok": ctx.key})

    reg = executor.builtin()
    reg.register("echo", echo)
    m = await member_factory()
    # The two bad ToDos in jobs of their own, in the same batch: a ToDo failing for good ends
    # its job and the job's ToDos still running with it.
    job = await job_factory(
        m, [{"key": f"t{i}", "action": "echo"} for i in range(100) if i not in (13, 42)]
    )
    bad = [await job_factory(m, [{"key": k, "action": "echo"}]) for k in ("t13", "t42")]
    d = dispatch.Dispatcher(db, registry=reg, concurrency=100, batch=100, lanes=1, tenant_cap=None)
    summary = await d.run_pass(30)
    assert summary.done == 98 and summary.failed == 2, summary.as_dict()
    async with db.user(m.claims) as s:
        todos = {t["key"]: t for j in [job, *bad] for t in await s.job_todos(j.id)}
        got = [(await s.job_get(j.id)).status for j in [job, *bad]]
    assert "unpaired surrogate" in todos["t13"]["error"]
    assert "deeper than 64" in todos["t42"]["error"]
    assert got == ["done", "failed", "failed"]
    assert sum(t["status"] == "done" for t in todos.values()) == 98


async def test_a_batch_the_database_refuses_is_stored_todo_by_todo(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    await job_factory(m, [{"key": f"t{i}", "action": "noop"} for i in range(100)])
    d = dispatch.Dispatcher(db)
    async with db.service() as s:
        rows = await s.todo_claim(target="cloud", owner=d.owner, limit=100)
    assert len(rows) == 100
    # Past the Python checks (forged here): a lone surrogate reaches Postgres, which refuses
    # the whole statement; the fallback stores the other 99 and fails this one.
    finished = [report._Finished(r, executor.Done({"n": i})) for i, r in enumerate(rows)]
    finished[7] = report._Finished(rows[7], executor.Done({"bad": "\ud800"}))
    summary = dispatch.Summary()
    await d._flush(finished, summary)
    assert summary.done == 99 and summary.failed == 1, summary.as_dict()
    async with db.service() as s:
        bad = await s.todo_get(rows[7].id)
    assert bad["status"] == "failed" and "cannot be stored" in bad["error"]


async def test_a_lane_that_fails_does_not_keep_the_pass_alive(
    proxied: tuple[proxy_mod.Proxy, store.Store],
) -> None:
    """A lane whose claim fails must leave the set of busy lanes, and a stopping lane never
    waits on the others: otherwise the pass (and a stop) could hang on an idle lane."""
    proxy, pdb = proxied
    d = dispatch.Dispatcher(pdb)
    busy: set[int] = set()
    proxy.refuse()
    with pytest.raises(errors.UnavailableError):
        await asyncio.wait_for(
            d._lane(5, lane._Slots(4), None, asyncio.Event(), lanes=(0, busy)), 10
        )
    assert busy == set()
    proxy.up()
    stop = asyncio.Event()
    stop.set()
    stale = {1}  # another lane still listed as busy
    summary = await asyncio.wait_for(
        d._lane(5, lane._Slots(4), stop, asyncio.Event(), lanes=(0, stale)), 5
    )
    assert summary.claimed == 0
