"""The job's terminal event comes last: a live SSE client and a long-poller see every ToDo's
final status before the stream ends or a page says ``done``, in the cancel, failure and retry
tails (issue 22, item 4; migration 20261207002100_terminal_event_last)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import psycopg
from cpa_scheduler import dispatch, errors, executor, store

from tests import events_contract
from tests.conftest import JobFactory, MemberFactory, register_action
from tests.functions.conftest import bearer

FINAL = {"done", "failed", "cancelled"}


def _graph(first: str = "noop") -> dict[str, Any]:
    """A ToDo that ends first (``first``), six slow ones beside it, and a dependent of each."""
    todos: list[dict[str, Any]] = [
        {"key": "first", "action": first, "params": {"duration_ms": 300}, "max_attempts": 1}
    ]
    for i in range(6):
        todos.append({"key": f"slow{i}", "action": "noop", "params": {"duration_ms": 1500}})
        todos.append({"key": f"next{i}", "action": "noop", "depends_on": [f"slow{i}"]})
    return {"todos": todos}


async def _sse(c: httpx.AsyncClient, headers: dict[str, str], job_id: str) -> list[dict[str, Any]]:
    """A live SSE client from the start: everything until the server closes the stream."""
    async with c.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as r:
        assert r.status_code == 200
        body = (await r.aread()).decode()
    return events_contract.parse_sse(body)[0]


async def _long_poll(
    c: httpx.AsyncClient, headers: dict[str, str], job_id: str
) -> list[dict[str, Any]]:
    """A long-poller from the start: pages until one says done."""
    out: list[dict[str, Any]] = []
    after = 0
    while True:
        r = await c.get(
            f"/v1/jobs/{job_id}/events", params={"after": after, "wait": 2}, headers=headers
        )
        page = r.json()
        out.extend(events_contract.validate(e) for e in page["events"])
        after = page["last_event_id"]
        if page["done"]:
            return out


def _final_view(events: list[dict[str, Any]]) -> tuple[dict[str, str], tuple[str, str]]:
    """Each ToDo's last status as the client saw it, and the last event."""
    last: dict[str, str] = {}
    for e in events:
        if e["kind"] == "todo.status":
            last[e["todo_id"]] = e["status"]
    return last, (events[-1]["kind"], events[-1]["status"])


async def _database(db_url: str, job_id: str) -> tuple[str, dict[str, str]]:
    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        cur = await conn.execute("select status from public.jobs where id = %s", (job_id,))
        row = await cur.fetchone()
        assert row is not None
        cur = await conn.execute(
            "select id::text, status from public.todos where job_id = %s", (job_id,)
        )
        return str(row[0]), {str(r[0]): str(r[1]) for r in await cur.fetchall()}


async def _running(db_url: str, job_id: str, n: int) -> None:
    for _ in range(200):
        _, todos = await _database(db_url, job_id)
        if sum(s == "running" for s in todos.values()) >= n:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the ToDos did not start")


def _check(followers: list[list[dict[str, Any]]], status: str, todos: dict[str, str]) -> None:
    assert set(todos.values()) <= FINAL, todos
    for seen in followers:
        last, end = _final_view(seen)
        assert end == ("job.status", status)
        assert last == todos  # every ToDo's final status, none still "running"


async def test_after_a_cancel_every_final_status_comes_before_the_end(
    live_api: str, db_url: str, db: store.Store, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    headers = bearer(m)
    async with httpx.AsyncClient(base_url=live_api, timeout=30) as c:
        job = (await c.post("/v1/jobs", headers=headers, json={"graph": _graph()})).json()
        runner = asyncio.create_task(dispatch.Dispatcher(db).run_pass(10))
        followers = [
            asyncio.create_task(_sse(c, headers, job["id"])),
            asyncio.create_task(_long_poll(c, headers, job["id"])),
        ]
        await _running(db_url, job["id"], 6)
        r = await c.post(f"/v1/jobs/{job['id']}/cancel", headers=headers)
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        seen = await asyncio.wait_for(asyncio.gather(*followers), 20)
        await runner
    status, todos = await _database(db_url, job["id"])
    assert status == "cancelled" and "cancelled" in todos.values()
    _check(list(seen), status, todos)


async def _failing_registry(fail_times: int) -> executor.Registry:
    calls = 0

    async def boom(params: dict[str, Any], ctx: executor.Context) -> executor.Outcome:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.3)
        if calls <= fail_times:
            raise errors.PermanentError("boom")
        return executor.Done({})

    reg = executor.builtin()
    reg.register("boom", boom)
    return reg


async def test_after_a_failure_and_after_a_retry_every_final_status_comes_before_the_end(
    live_api: str,
    db_url: str,
    db: store.Store,
    member_factory: MemberFactory,
    job_factory: JobFactory,
) -> None:
    await register_action(db, "boom")
    reg = await _failing_registry(fail_times=1)
    m = await member_factory()
    headers = bearer(m)
    async with httpx.AsyncClient(base_url=live_api, timeout=30) as c:
        # The API knows the shipped actions only: the job with the test's action goes in directly.
        job = {"id": str((await job_factory(m, _graph("boom")["todos"])).id)}
        followers = [
            asyncio.create_task(_sse(c, headers, job["id"])),
            asyncio.create_task(_long_poll(c, headers, job["id"])),
        ]
        # 'first' fails for good while the slow ToDos run: the job fails, they end cancelled.
        await dispatch.Dispatcher(db, registry=reg).run_pass(10)
        seen = await asyncio.wait_for(asyncio.gather(*followers), 20)
        status, todos = await _database(db_url, job["id"])
        assert status == "failed" and "failed" in todos.values()
        assert sum(s == "cancelled" for s in todos.values()) == 12
        _check(list(seen), status, todos)

        # The retry tail: followers from the start read past the first run's 'failed' event
        # and end with the retried run's end.
        r = await c.post(f"/v1/jobs/{job['id']}/retry", headers=headers)
        assert r.status_code == 200, r.text
        followers = [
            asyncio.create_task(_sse(c, headers, job["id"])),
            asyncio.create_task(_long_poll(c, headers, job["id"])),
        ]
        await dispatch.Dispatcher(db, registry=reg).run_pass(10)
        seen = await asyncio.wait_for(asyncio.gather(*followers), 20)
    status, todos = await _database(db_url, job["id"])
    assert status == "done" and set(todos.values()) == {"done"}
    _check(list(seen), status, todos)
    for events in seen:  # the first run's end is in there, and did not end the stream
        assert ("job.status", "failed") in [(e["kind"], e["status"]) for e in events]
