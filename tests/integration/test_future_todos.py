"""Future-dated ToDos stay off the claim path: never claimed early, claimed when due."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from cpa_scheduler import store
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import JobFactory, Member, MemberFactory

CLAIM = "select now() as at, c.id, c.run_after from cpa.todo_claim_v3('cloud', 'test', 1000) c"

# Offsets in seconds from the insert: far past, far future, and just ahead (due by the time the
# claim runs, but parked when written).
OFFSETS = st.one_of(
    st.floats(min_value=-86_400, max_value=-0.5),
    st.floats(min_value=1.0, max_value=86_400 * 400),
    st.floats(min_value=0.02, max_value=0.25),
)


async def _job_with_run_after(
    db: store.Store, job_factory: JobFactory, m: Member, offsets: list[float]
) -> uuid.UUID:
    todos = [{"key": f"t{i}", "action": "noop"} for i in range(len(offsets))]
    job = await job_factory(m, todos)
    async with db.admin() as s:
        # One statement, so every ToDo's offset counts from the same clock reading; the park
        # trigger sees each row become ready with its run_after.
        await s.conn.execute(
            "update public.todos t set run_after = clock_timestamp()"
            " + make_interval(secs => o.s) from unnest(%s::float8[]) with ordinality o(s, n)"
            " where t.job_id = %s and t.key = 't' || (o.n - 1)",
            (offsets, job.id),
        )
    return job.id


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(offsets=st.lists(OFFSETS, min_size=1, max_size=12))
async def test_the_claim_never_returns_a_todo_early_and_returns_every_due_one(
    db: store.Store,
    member_factory: MemberFactory,
    job_factory: JobFactory,
    offsets: list[float],
) -> None:
    m = await member_factory()
    job_id = await _job_with_run_after(db, job_factory, m, offsets)
    await asyncio.sleep(0.3)  # the "just ahead" ones are due now, and still parked
    async with db.service() as s:
        cur = await s.conn.execute("select now() as at")
        at = (await cur.fetchone())["at"]  # the claim's clock: now() is the transaction's
        cur = await s.conn.execute(CLAIM)
        claimed: list[dict[str, Any]] = list(await cur.fetchall())
    async with db.admin() as s:
        cur = await s.conn.execute(
            "select id, status, parked, run_after from public.todos where job_id = %s",
            (job_id,),
        )
        rows = {r["id"]: r for r in await cur.fetchall()}
        await s.conn.execute("delete from public.jobs where id = %s", (job_id,))
    mine = [c for c in claimed if c["id"] in rows]
    # Never early: each claimed ToDo was due at the claim.
    assert all(c["run_after"] <= at for c in mine)
    # On time: every ToDo of the job due at the claim's start was claimed.
    due = {i for i, r in rows.items() if r["run_after"] <= at}
    assert {c["id"] for c in mine} == due
    # What stays behind is parked, so the claims' index never held it.
    assert all(r["parked"] and r["status"] == "ready" for i, r in rows.items() if i not in due)


async def test_every_due_one_is_claimed_even_when_nothing_was_claimed(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    job_id = await _job_with_run_after(db, job_factory, m, [3600.0, 0.1, -5.0])
    await asyncio.sleep(0.2)
    async with db.service() as s:
        cur = await s.conn.execute(CLAIM)
        assert len(await cur.fetchall()) == 2
        cur = await s.conn.execute(CLAIM)
        assert await cur.fetchall() == []
    async with db.admin() as s:
        cur = await s.conn.execute(
            "select status, parked from public.todos where job_id = %s and status = 'ready'",
            (job_id,),
        )
        assert await cur.fetchall() == [{"status": "ready", "parked": True}]


async def test_a_parked_todo_starts_on_time(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    job_id = await _job_with_run_after(db, job_factory, m, [0.6])
    got: list[dict[str, Any]] = []
    for _ in range(200):
        async with db.service() as s:
            cur = await s.conn.execute(CLAIM)
            got = list(await cur.fetchall())
        if got:
            break
        await asyncio.sleep(0.01)
    (row,) = got
    async with db.admin() as s:
        cur = await s.conn.execute(
            "select started_at - run_after as late from public.todos where id = %s", (row["id"],)
        )
        late = (await cur.fetchone())["late"]
    assert row["run_after"] <= row["at"]
    # Polled every 10 ms: the claim after the due time takes it (a loaded machine adds some).
    assert late.total_seconds() < 0.5
    assert job_id


async def test_desktop_agents_claim_parked_todos_when_due(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    todo = {"key": "o", "action": "desktop.open_app", "target": "desktop", "params": {"app": "X"}}
    job = await job_factory(m, [todo])
    async with db.admin() as s:
        await s.conn.execute(
            "update public.todos set run_after = clock_timestamp() + interval '0.2 s'"
            " where job_id = %s",
            (job.id,),
        )
        cur = await s.conn.execute("select parked from public.todos where job_id = %s", (job.id,))
        assert (await cur.fetchone())["parked"] is True
    # todo_claim_v3 with a tenant is a desktop agent's claim.
    agent_claim = "select job_id from cpa.todo_claim_v3('desktop', 'agent:a', 5, 60, %s)"
    async with db.service() as s:
        cur = await s.conn.execute(agent_claim, (m.tenant_id,))
        assert await cur.fetchall() == []
    await asyncio.sleep(0.25)
    async with db.service() as s:
        cur = await s.conn.execute(agent_claim, (m.tenant_id,))
        assert await cur.fetchall() == [{"job_id": job.id}]


async def test_a_claim_un_parks_no_more_than_it_may_claim(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    """A row un-parked and left unclaimed would stay locked until commit (other claims skip
    it) and then wait for a claim no alarm announces."""
    m = await member_factory()
    job_id = await _job_with_run_after(db, job_factory, m, [0.05, 0.06, 0.07])
    await asyncio.sleep(0.15)
    async with db.service() as s:
        cur = await s.conn.execute("select count(*) as n from cpa.todo_claim_v3('cloud', 'x', 0)")
        assert (await cur.fetchone())["n"] == 0
        cur = await s.conn.execute("select count(*) as n from cpa.todo_claim_v3('cloud', 'x', 2)")
        assert (await cur.fetchone())["n"] == 2
    rows = await _rows(db, job_id)
    assert sorted((r["status"], r["parked"]) for r in rows) == [
        ("ready", True),
        ("running", False),
        ("running", False),
    ]


async def _rows(db: store.Store, job_id: uuid.UUID) -> list[dict[str, Any]]:
    async with db.admin() as s:
        cur = await s.conn.execute(
            "select status, parked from public.todos where job_id = %s", (job_id,)
        )
        return list(await cur.fetchall())
