"""Fairness under load (a per-tenant cap on running ToDos) and faster recovery of the leases of
dispatchers that are provably dead."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import pytest
from cpa_scheduler import dispatch, health, store

from tests.conftest import JobFactory, MemberFactory
from tests.integration.test_dispatch_safety import done_events_per_todo, job_state


async def _running(db: store.Store, tenant_id: Any) -> int:
    async with db.admin() as s:
        cur = await s.conn.execute(
            "select count(*) as n from public.todos where tenant_id = %s and status = 'running'",
            (tenant_id,),
        )
        row = await cur.fetchone()
    assert row is not None
    return int(row["n"])


async def test_claim_respects_the_tenant_cap(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    a = await member_factory("A")
    b = await member_factory("B")
    await job_factory(a, [{"key": f"a{i}", "action": "noop"} for i in range(50)])
    async with db.service() as s:
        first = await s.todo_claim(target="cloud", owner="w", limit=50, tenant_cap=5)
        again = await s.todo_claim(target="cloud", owner="w", limit=50, tenant_cap=5)
    assert len(first) == 5 and again == []
    await job_factory(b, [{"key": "b", "action": "noop"}])
    async with db.service() as s:
        rows = await s.todo_claim(target="cloud", owner="w", limit=50, tenant_cap=5)
    assert [r.tenant_id for r in rows] == [b.tenant_id]


async def test_a_saturating_tenant_does_not_delay_another(
    db: store.Store, db_url: str, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    a = await member_factory("A")
    b = await member_factory("B")
    await job_factory(
        a, [{"key": f"a{i}", "action": "noop", "params": {"duration_ms": 2000}} for i in range(100)]
    )
    d = dispatch.Dispatcher(db, concurrency=16, tenant_cap=8)
    stop = asyncio.Event()
    worker = asyncio.create_task(d.run_forever(db_url, stop=stop))
    try:
        for _ in range(100):
            if await _running(db, a.tenant_id) >= 8:
                break
            await asyncio.sleep(0.05)
        assert await _running(db, a.tenant_id) == 8
        job = await job_factory(b, [{"key": "b", "action": "noop"}])
        for _ in range(40):
            status, _ = await job_state(db, b, job.id)
            if status == "done":
                break
            await asyncio.sleep(0.05)
        async with db.user(b.claims) as s:
            [todo] = await s.job_todos(job.id)
        delay = (todo["started_at"] - job.created_at).total_seconds()
        assert todo["status"] == "done" and delay < 1.0, delay
        assert await _running(db, a.tenant_id) <= 8
    finally:
        stop.set()
        await asyncio.wait_for(worker, 30)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


async def test_leases_of_a_dead_dispatcher_on_this_host_are_reclaimed_at_once(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    job = await job_factory(m, [{"key": f"t{i}", "action": "noop"} for i in range(6)])
    host = socket.gethostname()
    dead = f"dispatcher:{host}:{_dead_pid()}:deadbeef"
    alive = f"dispatcher:{host}:{os.getppid()}:cafe0001"  # a live process: not provably dead
    elsewhere = f"dispatcher:other-host:{_dead_pid()}:cafe0002"
    async with db.service() as s:
        for owner in (dead, alive, elsewhere):
            rows = await s.todo_claim(target="cloud", owner=owner, limit=2, lease_seconds=600)
            assert len(rows) == 2
    d = dispatch.Dispatcher(db)
    started = time.monotonic()
    assert await d.reclaim_dead() == 2
    summary = await d.run_pass(10)
    took = time.monotonic() - started
    assert summary.done == 2, summary.as_dict()
    async with db.user(m.claims) as s:
        owners = {t["lease_owner"] for t in await s.job_todos(job.id) if t["status"] == "running"}
    assert owners == {alive, elsewhere}
    assert took < 5.0  # generous for a loaded CI machine; measured 0.02-0.04 s
    print(f"\nrecovery of a dead dispatcher's leases (600 s lease): {took:.3f} s")


def test_dead_owners_are_only_those_provably_gone() -> None:
    me = health.owner_name()
    host, pid = me.split(":")[1], me.split(":")[2]
    gone = _dead_pid()
    owners = [
        f"dispatcher:{host}:{gone}:aa",  # pid gone
        f"dispatcher:{host}:{pid}:old",  # this very process under an older name
        f"dispatcher:{host}:1:bb",  # pid 1 exists
        f"dispatcher:elsewhere:{gone}:cc",
        f"agent:{host}:{gone}:dd",
        "dispatcher:legacyname",
        me,
    ]
    assert health.dead_owners(owners, me) == owners[:2]


@pytest.mark.slow
async def test_twenty_kill_nines_during_a_400_todo_job_lose_nothing(
    db: store.Store, db_url: str, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    todos = [
        {
            "key": f"t{i}",
            "action": "noop",
            "params": {"duration_ms": 250},
            "depends_on": [f"t{i - 100}"] if i >= 100 else [],
            "max_attempts": 25,
        }
        for i in range(400)
    ]
    job = await job_factory(m, todos)
    # A kill counts a lost lease of each ToDo it interrupts (at CPA_LOST_LEASE_LIMIT the ToDo
    # fails: one that crashes its worker must not loop forever); 20 kills in quick succession
    # must not reach it here (tests/integration/test_lost_leases.py tests the limit).
    env = {**os.environ, "DATABASE_URL": db_url, "CPA_LOG_LEVEL": "ERROR",
           "CPA_LOST_LEASE_LIMIT": "25"}  # fmt: skip
    cmd = [sys.executable, "-m", "cpa_scheduler.cli", "dispatch", "--lease", "30",
           "--concurrency", "16"]  # fmt: skip
    rng = random.Random(10)
    kills = 0
    started = time.monotonic()
    while kills < 20:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await asyncio.sleep(rng.uniform(0.8, 1.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        kills += 1
    status, st = await job_state(db, m, job.id)
    killed_at = time.monotonic()
    # A last worker (started after the 20th kill) finishes: it reclaims the dead leases at
    # once, so nothing waits out the 30 s lease.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            status, st = await job_state(db, m, job.id)
            if status in ("done", "failed"):
                break
            await asyncio.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert status == "done" and set(st.values()) == {"done"}, (status, st)
    per_todo = await done_events_per_todo(db_url, job.id)
    assert len(per_todo) == 400 and set(per_todo.values()) == {1}
    print(f"\n20 kill -9s: job done {time.monotonic() - killed_at:.1f} s after the last kill "
          f"({time.monotonic() - started:.1f} s in all)")  # fmt: skip
