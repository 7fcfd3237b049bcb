"""SQL operations: concurrent claims, leases, graph semantics, failure, cancel, retry, fairness."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from cpa_scheduler import errors, store

from tests.conftest import JobFactory, Member, MemberFactory


async def claim(
    db: store.Store, owner: str = "w", limit: int = 50, lease: float = 60.0, **kw: Any
) -> list[dict[str, Any]]:
    async with db.service() as s:
        rows = await s.todo_claim(
            target=kw.pop("target", "cloud"), owner=owner, limit=limit, lease_seconds=lease, **kw
        )
    return [dataclasses.asdict(r) for r in rows]  # these tests read the columns by name


async def complete(
    db: store.Store, rows: list[dict[str, Any]], owner: str = "w", result: Any = None
) -> int:
    async with db.service() as s:
        return await s.todo_complete(
            [
                {"id": str(r["id"]), "owner": owner, "attempt": r["attempts"], "result": result}
                for r in rows
            ]
        )


async def statuses(db: store.Store, member: Member, job_id: Any) -> dict[str, str]:
    async with db.user(member.claims) as s:
        return {t["key"]: t["status"] for t in await s.job_todos(job_id)}


async def job_status(db: store.Store, member: Member, job_id: Any) -> store.JobRow:
    async with db.user(member.claims) as s:
        return await s.job_get(job_id)


async def test_four_claimers_over_5000_claim_each_once(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    for _ in range(5):  # a job holds at most 1000 ToDos
        await job_factory(m, [{"key": f"k{i}", "action": "noop"} for i in range(1000)])
    seen: list[str] = []

    async def worker(name: str) -> None:
        while True:
            rows = await claim(db, owner=name, limit=100)
            if not rows:
                return
            seen.extend(str(r["id"]) for r in rows)
            await complete(db, rows, owner=name)

    await asyncio.gather(*(worker(f"w{i}") for i in range(4)))
    assert len(seen) == 5000
    assert len(set(seen)) == 5000


async def test_diamond_releases_join_only_after_both(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    job = await job_factory(
        m,
        [
            {"key": "a", "action": "noop"},
            {"key": "b", "action": "noop", "depends_on": ["a"]},
            {"key": "c", "action": "noop", "depends_on": ["a"]},
            {"key": "d", "action": "noop", "depends_on": ["b", "c"]},
        ],
    )
    [a] = await claim(db)
    await complete(db, [a], result={"text": "A"})
    bc = await claim(db)
    assert sorted(r["key"] for r in bc) == ["b", "c"]
    b = next(r for r in bc if r["key"] == "b")
    c = next(r for r in bc if r["key"] == "c")
    await complete(db, [b])
    assert (await statuses(db, m, job.id))["d"] == "waiting"
    assert await claim(db) == []
    await complete(db, [c])
    assert (await statuses(db, m, job.id))["d"] == "ready"
    [d] = await claim(db)
    await complete(db, [d])
    final = await job_status(db, m, job.id)
    assert final.status == "done" and final.completed_at is not None


async def test_completing_twice_is_harmless(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    job = await job_factory(
        m, [{"key": "a", "action": "noop"}, {"key": "b", "action": "noop", "depends_on": ["a"]}]
    )
    [a] = await claim(db)
    assert await complete(db, [a]) == 1
    assert await complete(db, [a]) == 0
    async with db.service() as s:
        b = (await s.job_todos(job.id))[1]
    assert b["deps_remaining"] == 0 and b["status"] == "ready"


async def test_expired_lease_is_reclaimed_and_late_completion_is_harmless(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    job = await job_factory(m, [{"key": "a", "action": "noop"}])
    [first] = await claim(db, owner="old", lease=0.2)
    assert first["attempts"] == 1
    assert await claim(db, owner="new") == []  # still leased
    await asyncio.sleep(0.4)
    [again] = await claim(db, owner="new")
    assert again["id"] == first["id"] and again["attempts"] == 2
    assert await complete(db, [first], owner="old") == 0  # the zombie's late completion
    assert (await statuses(db, m, job.id))["a"] == "running"
    assert await complete(db, [again], owner="new") == 1
    assert (await job_status(db, m, job.id)).status == "done"


async def test_expiry_on_the_last_attempt_requeues_a_lost_worker_s_todo(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    """A lost worker is not a failed attempt (tests/integration/test_lost_leases.py)."""
    m = await member_factory()
    job = await job_factory(
        m,
        [
            {"key": "a", "action": "noop", "max_attempts": 1},
            {"key": "b", "action": "noop", "depends_on": ["a"]},
        ],
    )
    await claim(db, owner="lost", lease=0.1)
    await asyncio.sleep(0.3)
    [again] = await claim(db)
    assert again["attempts"] == 2 and "lease expired" in again["error"]
    assert await statuses(db, m, job.id) == {"a": "running", "b": "waiting"}


async def test_retryable_failure_backs_off_then_fails_job_past_max_attempts(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    job = await job_factory(
        m,
        [
            {"key": "a", "action": "noop"},
            {"key": "b", "action": "noop", "max_attempts": 2},
            {"key": "c", "action": "noop", "depends_on": ["a"]},
            {"key": "d", "action": "noop", "depends_on": ["b", "c"]},
        ],
    )
    rows = await claim(db)
    b = next(r for r in rows if r["key"] == "b")
    a = next(r for r in rows if r["key"] == "a")
    await complete(db, [a])
    async with db.service() as s:
        await s.todo_fail(
            [
                {
                    "id": str(b["id"]),
                    "owner": "w",
                    "attempt": 1,
                    "error": "503 upstream",
                    "retryable": True,
                }
            ],
            backoff_base=0.2,
        )
        row = await s.todo_get(b["id"])
    assert row["status"] == "ready" and row["run_after"] > datetime.now(UTC)
    [c] = await claim(db)  # b is backing off; c is ready
    assert c["key"] == "c"
    await asyncio.sleep(0.3)
    [b2] = await claim(db)
    assert b2["key"] == "b" and b2["attempts"] == 2
    async with db.service() as s:
        await s.todo_fail(
            [
                {
                    "id": str(b2["id"]),
                    "owner": "w",
                    "attempt": 2,
                    "error": "503 upstream",
                    "retryable": True,
                }
            ]
        )
    st = await statuses(db, m, job.id)
    # The running sibling ends with the job (before the job's event); its late result is dropped.
    assert st["b"] == "failed" and st["d"] == "cancelled" and st["c"] == "cancelled"
    final = await job_status(db, m, job.id)
    assert final.status == "failed"
    assert "'b' failed: 503 upstream (gave up after 2 attempts)" in final.error
    assert await complete(db, [c]) == 0
    assert (await statuses(db, m, job.id))["c"] == "cancelled"
    assert (await job_status(db, m, job.id)).status == "failed"


async def test_permanent_failure_fails_at_once(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    job = await job_factory(m, [{"key": "a", "action": "noop", "max_attempts": 5}])
    [a] = await claim(db)
    async with db.service() as s:
        await s.todo_fail(
            [{"id": str(a["id"]), "owner": "w", "error": "bad params", "retryable": False}]
        )
    assert (await job_status(db, m, job.id)).status == "failed"


async def test_cancel_stops_everything_not_finished(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    job = await job_factory(
        m,
        [
            {"key": "a", "action": "noop"},
            {"key": "b", "action": "noop"},
            {"key": "c", "action": "noop", "depends_on": ["a"]},
        ],
    )
    rows = await claim(db, limit=1)
    async with db.user(m.claims) as s:
        cancelled = await s.job_cancel(job.id)
    assert cancelled.status == "cancelled"
    st = await statuses(db, m, job.id)
    assert set(st.values()) == {"cancelled"}  # the running one too, before the job's event
    assert await claim(db) == []
    assert await complete(db, rows) == 0  # its worker's late result is dropped
    st = await statuses(db, m, job.id)
    assert set(st.values()) == {"cancelled"}
    async with db.user(m.claims) as s:
        assert (await s.job_cancel(job.id)).status == "cancelled"  # idempotent


async def test_retry_resumes_a_failed_job(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    job = await job_factory(
        m,
        [
            {"key": "a", "action": "noop"},
            {"key": "b", "action": "noop", "depends_on": ["a"]},
            {"key": "x", "action": "noop"},
        ],
    )
    rows = await claim(db)
    a = next(r for r in rows if r["key"] == "a")
    x = next(r for r in rows if r["key"] == "x")
    await complete(db, [x])
    async with db.service() as s:
        await s.todo_fail([{"id": str(a["id"]), "owner": "w", "error": "boom", "retryable": False}])
    async with db.user(m.claims) as s:
        with pytest.raises(errors.ConflictError):
            await s.job_cancel(job.id)
    async with db.user(m.claims) as s:
        retried = await s.job_retry(job.id)
    assert retried.status == "running" and retried.retry_count == 1
    assert await statuses(db, m, job.id) == {"a": "ready", "b": "waiting", "x": "done"}
    for _ in range(2):
        await complete(db, await claim(db))
    assert (await job_status(db, m, job.id)).status == "done"
    async with db.user(m.claims) as s:
        with pytest.raises(errors.ConflictError, match="only failed or cancelled"):
            await s.job_retry(job.id)


async def test_fairness_small_tenant_is_not_starved(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    big = await member_factory("big")
    small = await member_factory("small")
    for _ in range(10):  # a job holds at most 1000 ToDos
        await job_factory(big, [{"key": f"k{i}", "action": "noop"} for i in range(1000)])
    await job_factory(small, [{"key": f"s{i}", "action": "noop"} for i in range(5)])
    rows = await claim(db, limit=20)
    by_tenant = [r["tenant_id"] for r in rows]
    assert by_tenant.count(small.tenant_id) == 5
    assert len(rows) >= 15


async def test_confirmation_gates_a_todo(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    job = await job_factory(
        m,
        [
            {
                "key": "send",
                "action": "email.send",
                "target": "desktop",
                "params": {"to": "anna@example.com", "subject": "Hi", "body": "Hello"},
                "requires_confirmation": True,
            }
        ],
    )
    assert (await statuses(db, m, job.id)) == {"send": "confirming"}
    assert await claim(db, target="desktop") == []
    async with db.user(m.claims) as s:
        [todo] = await s.job_todos(job.id)
        await s.todo_confirm(todo["id"], approved=True)
    [claimed] = await claim(db, target="desktop")
    assert claimed["key"] == "send"


async def test_declining_fails_the_job(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    job = await job_factory(
        m,
        [
            {
                "key": "send",
                "action": "email.send",
                "target": "desktop",
                "params": {"to": "anna@example.com", "subject": "Hi", "body": "Hello"},
                "requires_confirmation": True,
            }
        ],
    )
    async with db.user(m.claims) as s:
        [todo] = await s.job_todos(job.id)
        await s.todo_confirm(todo["id"], approved=False)
        final = await s.job_get(job.id)
    assert final.status == "failed" and "declined" in final.error


async def test_idempotency_key_returns_the_same_job(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    first, second = await asyncio.gather(
        job_factory(m, idempotency_key="abc"), job_factory(m, idempotency_key="abc")
    )
    assert first.id == second.id
    async with db.user(m.claims) as s:
        assert len(await s.job_list()) == 1


async def test_unknown_dependency_in_sql_is_rejected(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    with pytest.raises(errors.InvalidError, match="not in the graph"):
        await job_factory(m, [{"key": "a", "action": "noop", "depends_on": ["zz"]}])


async def test_extend_and_snooze(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    await job_factory(m, [{"key": "t", "action": "wait", "params": {"seconds": 1}}])
    [t] = await claim(db, lease=1)
    async with db.service() as s:
        assert await s.todo_extend([t["id"]], "w", 60) == 1
        assert await s.todo_extend([t["id"]], "other", 60) == 0
        until = datetime.now(UTC) + timedelta(seconds=0.3)
        assert await s.todo_snooze(t["id"], "w", until) is True
        parked = await s.todo_get(t["id"])
    assert (
        parked["status"] == "ready"
        and parked["attempts"] == 0
        and parked["timer_until"] is not None
    )
    assert await claim(db) == []
    await asyncio.sleep(0.4)
    [again] = await claim(db)
    assert again["attempts"] == 1


async def test_refusals_release_then_fail(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    job = await job_factory(
        m, [{"key": "o", "action": "desktop.open_app", "target": "desktop", "params": {"app": "x"}}]
    )
    for i in range(3):
        async with db.user(m.claims) as s:
            [row] = await s.agent_claim(m.tenant_id, f"agent{i}", ["desktop.open_app"], 5)
            assert row["attempts"] == 1
            await s.agent_release(f"agent{i}", [{"id": str(row["id"])}], refusal=True)
    final = await job_status(db, m, job.id)
    assert final.status == "failed" and "Refused by 3 agents" in final.error


async def test_todo_events_and_notify(
    db: store.Store, db_url: str, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as listener:
        await listener.execute("listen cpa_todo_ready")
        job = await job_factory(m, [{"key": "a", "action": "noop"}])
        notes = [n async for n in listener.notifies(timeout=5.0, stop_after=1)]
        assert [n.channel for n in notes] == ["cpa_todo_ready"]
    [a] = await claim(db)
    await complete(db, [a])
    async with db.user(m.claims) as s:
        events = await s.event_list(job.id)
    kinds = [(e["kind"], e["status"]) for e in events]
    assert kinds == [
        ("job.status", "pending"),
        ("todo.status", "ready"),
        ("todo.status", "running"),
        ("job.status", "running"),
        ("todo.status", "done"),
        ("job.status", "done"),
    ]
    assert [e["id"] for e in events] == sorted(e["id"] for e in events)
