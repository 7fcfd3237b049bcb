"""A lost worker is not a failed attempt: expired or reclaimed leases count in ``lost_leases``,
not against ``max_attempts``; a ToDo that loses ``CPA_LOST_LEASE_LIMIT`` workers fails with its
own message (migration 20261207002000_lost_leases)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from cpa_scheduler import settings, store

from tests.conftest import JobFactory, MemberFactory
from tests.integration.test_dispatch_safety import job_state
from tests.integration.test_operations import claim, complete, job_status, statuses


async def _lose(db: store.Store, owner: str = "lost") -> list[dict[str, Any]]:
    """Claim with a lease that runs out at once: the worker 'dies' holding them."""
    rows = await claim(db, owner=owner, lease=0.05)
    await asyncio.sleep(0.15)
    return rows


async def _todo(db: store.Store, job_id: Any, key: str) -> dict[str, Any]:
    async with db.service() as s:
        return next(t for t in await s.job_todos(job_id) if t["key"] == key)


@pytest.fixture
async def db3(db_url: str) -> AsyncIterator[store.Store]:
    """A store whose transactions carry a lost-lease limit of 3 (CPA_LOST_LEASE_LIMIT=3)."""
    s = store.Store(db_url, max_size=4, lost_lease_limit=3)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


def test_the_limit_is_read_from_the_environment() -> None:
    assert settings.from_env({}).lost_lease_limit == 5
    assert settings.from_env({"CPA_LOST_LEASE_LIMIT": "2"}).lost_lease_limit == 2


async def test_a_lost_lease_does_not_spend_the_only_attempt(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    job = await job_factory(m, [{"key": "a", "action": "noop", "max_attempts": 1}])
    [lost] = await _lose(db)
    [again] = await claim(db, owner="new")
    assert again["id"] == lost["id"] and again["attempts"] == 2 and again["lost_leases"] == 1
    assert again["error"].startswith("The lease expired during attempt 1")
    assert await complete(db, [lost], owner="lost") == 0  # the lost worker's fence still holds
    assert await complete(db, [again], owner="new") == 1
    assert (await job_status(db, m, job.id)).status == "done"


async def test_failed_attempts_exclude_lost_leases(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    job = await job_factory(m, [{"key": "a", "action": "noop", "max_attempts": 2}])
    await _lose(db)
    await _lose(db)

    async def fail(owner: str) -> None:
        [row] = await claim(db, owner=owner)
        async with db.service() as s:
            n = await s.todo_fail(
                [{"id": str(row["id"]), "owner": owner, "attempt": row["attempts"],
                  "error": "boom", "retryable": True}],
                backoff_base=0,
            )  # fmt: skip
        assert n == 1

    await fail("w1")  # the first failed attempt of two: retried
    assert (await _todo(db, job.id, "a"))["status"] == "ready"
    await fail("w2")  # the second: terminal, after 2 attempts (not 4)
    todo = await _todo(db, job.id, "a")
    assert todo["status"] == "failed" and todo["error"] == "boom (gave up after 2 attempts)"
    assert todo["attempts"] == 4 and todo["lost_leases"] == 2


async def test_a_todo_that_loses_every_worker_fails_at_the_limit_with_its_own_message(
    db3: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    job = await job_factory(
        m,
        [
            {"key": "a", "action": "noop", "max_attempts": 25},
            {"key": "b", "action": "noop", "depends_on": ["a"]},
        ],
    )
    for _ in range(3):
        assert len(await _lose(db3)) == 1
    assert await claim(db3) == []  # the third loss ended it
    assert await statuses(db3, m, job.id) == {"a": "failed", "b": "cancelled"}
    todo = await _todo(db3, job.id, "a")
    assert todo["lost_leases"] == 3
    assert "The worker running it was lost 3 times" in todo["error"]
    assert "CPA_LOST_LEASE_LIMIT" in todo["error"]
    final = await job_status(db3, m, job.id)
    assert final.status == "failed" and "lost 3 times" in (final.error or "")

    # A retry starts the count again.
    async with db3.user(m.claims) as s:
        await s.job_retry(job.id)
    todo = await _todo(db3, job.id, "a")
    assert todo["status"] == "ready" and todo["lost_leases"] == 0 and todo["attempts"] == 0


async def test_unset_limit_is_five(
    db_url: str, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    """A transaction that sets no limit (a caller of the previous deploy, pg_cron) gets 5."""
    m = await member_factory()
    job = await job_factory(m, [{"key": "a", "action": "noop"}])
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        for n in range(1, 6):
            await conn.execute(
                "update public.todos set status = 'running', lease_owner = 'x',"
                " attempts = attempts + 1, lease_expires_at = now() - interval '1 second'"
                " where job_id = %s",
                (job.id,),
            )
            cur = await conn.execute("select private.todo_expire_v3(100)")
            assert (await cur.fetchone()) == (1,)
            cur = await conn.execute(
                "select status, lost_leases from public.todos where job_id = %s", (job.id,)
            )
            assert await cur.fetchone() == ("ready" if n < 5 else "failed", n)


# --- workers that die --------------------------------------------------------------------------


def _worker(db_url: str, *extra: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "DATABASE_URL": db_url, "CPA_LOG_LEVEL": "ERROR"}
    cmd = [sys.executable, "-m", "cpa_scheduler.cli", "dispatch", "--lease", "30",
           "--concurrency", "32", "--metrics-port", "0", *extra]  # fmt: skip
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def _events(db_url: str, job_id: Any) -> list[tuple[int, str, str]]:
    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        cur = await conn.execute(
            "select id, coalesce(todo_id::text, ''), status from public.job_events"
            " where job_id = %s and kind in ('todo.status', 'job.status') order by id",
            (job_id,),
        )
        return [(int(r[0]), str(r[1]), str(r[2])) for r in await cur.fetchall()]


# The run: 20 chains x 20 steps of 3 s, 12 kills about 4 s apart (3.5-4.5 s), the
# default max_attempts (3) and lost-lease limit (5).
STEP_MS = 3000


@pytest.mark.slow
async def test_twelve_kill_nines_of_a_worker_during_a_400_todo_job_fail_nothing(
    db: store.Store, db_url: str, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    todos = [
        {
            "key": f"c{c}s{s}",
            "action": "noop",
            "params": {"duration_ms": STEP_MS},
            "depends_on": [f"c{c}s{s - 1}"] if s else [],
        }
        for c in range(20)
        for s in range(20)
    ]
    job = await job_factory(m, todos)  # max_attempts: the default 3
    rng = random.Random(22)
    started = time.monotonic()
    steady = _worker(db_url)  # a second worker that is never killed
    victim = _worker(db_url)
    kills = 0
    try:
        while kills < 12:
            await asyncio.sleep(rng.uniform(3.5, 4.5) * STEP_MS / 3000)
            victim.send_signal(signal.SIGKILL)
            victim.wait(10)
            kills += 1
            status, _ = await job_state(db, m, job.id)
            assert status == "running", f"the job is {status} after {kills} kills"
            victim = _worker(db_url)  # restarted at once, as a supervisor would
        for _ in range(1200):
            status, st = await job_state(db, m, job.id)
            if status in ("done", "failed", "cancelled"):
                break
            await asyncio.sleep(0.1)
    finally:
        for proc in (victim, steady):
            proc.send_signal(signal.SIGTERM)
        for proc in (victim, steady):
            proc.wait(30)
    async with db.service() as s:
        rows = await s.job_todos(job.id)
    lost = sum(r["lost_leases"] for r in rows)
    assert status == "done" and set(st.values()) == {"done"}, (status, st)
    # Nothing lost: every ToDo done exactly once; nothing ran after it was done.
    events = await _events(db_url, job.id)
    done_at: dict[str, int] = {}
    ran_after_done = 0
    for event_id, todo_id, ev_status in events:
        if not todo_id:
            continue
        if ev_status == "done":
            assert todo_id not in done_at, f"ToDo {todo_id} done twice"
            done_at[todo_id] = event_id
        elif ev_status == "running" and todo_id in done_at:
            ran_after_done += 1
    assert len(done_at) == 400 and ran_after_done == 0
    assert max(r["lost_leases"] for r in rows) < 5
    assert all(r["attempts"] - r["lost_leases"] == 1 for r in rows)  # no failed attempt
    print(f"\n12 kill -9s: job done in {time.monotonic() - started:.1f} s; {lost} leases lost "
          f"(max {max(r['lost_leases'] for r in rows)} on one ToDo), 0 attempts spent, "
          f"0 run after done")  # fmt: skip


@pytest.mark.slow
async def test_a_todo_that_kills_every_worker_fails_at_the_limit(
    db: store.Store, db_url: str, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    """The ToDo 'crashes' its worker: whenever a worker runs it, that worker is killed (as the
    kernel's OOM killer would a worker whose ToDo eats its memory). The default limit, 5."""
    m = await member_factory()
    job = await job_factory(
        m,
        [
            {"key": "poison", "action": "noop", "params": {"duration_ms": 60_000}},
            {"key": "after", "action": "noop", "depends_on": ["poison"]},
        ],
    )
    kills = 0
    worker = _worker(db_url)
    try:
        for _ in range(600):
            status, st = await job_state(db, m, job.id)
            if status != "running" and status != "pending":
                break
            owner = (await _todo(db, job.id, "poison"))["lease_owner"] or ""
            if st["poison"] == "running" and f":{worker.pid}:" in owner:
                worker.send_signal(signal.SIGKILL)
                worker.wait(10)
                kills += 1
                worker = _worker(db_url)  # the restart reclaims the dead worker's lease at once
            await asyncio.sleep(0.1)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)
    todo = await _todo(db, job.id, "poison")
    assert (status, st) == ("failed", {"poison": "failed", "after": "cancelled"})
    assert kills == 5 and todo["lost_leases"] == 5
    assert todo["error"].startswith("The worker running it was lost 5 times")
    final = await job_status(db, m, job.id)
    assert "lost 5 times" in (final.error or "")
