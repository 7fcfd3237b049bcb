"""Quotas on schedules: a cap on active schedules, creation counted by the rate limit, and a
budget of scheduled jobs per minute whose overflow is skipped visibly (issue 22)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from cpa_scheduler import schedules, service, store

from tests.conftest import MemberFactory
from tests.functions.conftest import bearer

BODY = {"cron": "* * * * *", "time_zone": "UTC", "request": "check my email"}
CLOCK = datetime(2030, 1, 7, 9, 0, tzinfo=UTC)  # a fixed clock: no test depends on the hour


async def test_150_concurrent_creations_stop_at_the_default_cap(
    client: httpx.AsyncClient, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    sem = asyncio.Semaphore(8)

    async def one() -> httpx.Response:
        async with sem:
            return await client.post("/v1/schedules", headers=bearer(m), json=BODY)

    answers = await asyncio.gather(*(one() for _ in range(150)))
    codes = Counter(r.status_code for r in answers)
    assert codes == {201: 100, 409: 50}, codes
    refusal = next(r for r in answers if r.status_code == 409)
    assert refusal.headers["content-type"] == "application/problem+json"
    assert "CPA_SCHEDULE_CAP = 100" in refusal.json()["detail"]
    listed = (await client.get("/v1/schedules", headers=bearer(m))).json()["schedules"]
    assert len(listed) == 100
    # A paused schedule does not count; resuming it past the cap is refused the same way.
    sid = listed[0]["id"]
    assert (await client.post(f"/v1/schedules/{sid}/pause", headers=bearer(m))).status_code == 200
    assert (await client.post("/v1/schedules", headers=bearer(m), json=BODY)).status_code == 201
    again = await client.post(f"/v1/schedules/{sid}/resume", headers=bearer(m))
    assert again.status_code == 409 and "CPA_SCHEDULE_CAP" in again.json()["detail"]


async def test_a_configured_cap(
    client: httpx.AsyncClient, wire: Callable[..., service.Services], member_factory: MemberFactory
) -> None:
    wire(schedule_cap=3)
    m = await member_factory()
    codes = Counter(
        [(await client.post("/v1/schedules", headers=bearer(m), json=BODY)).status_code
         for _ in range(5)]
    )  # fmt: skip
    assert codes == {201: 3, 409: 2}


async def test_schedule_creation_counts_against_the_rate_limit(
    client: httpx.AsyncClient, wire: Callable[..., service.Services], member_factory: MemberFactory
) -> None:
    wire(rate_limit=3, rate_window=3600)
    m = await member_factory()
    job = await client.post("/v1/jobs", headers=bearer(m), json={"request": "check my email"})
    assert job.status_code == 201
    codes = [
        (await client.post("/v1/schedules", headers=bearer(m), json=BODY)).status_code
        for _ in range(3)
    ]
    assert codes == [201, 201, 429]
    refused = await client.post("/v1/schedules", headers=bearer(m), json=BODY)
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert refused.headers["content-type"] == "application/problem+json"
    assert "CPA_RATE_LIMIT" in refused.json()["detail"]


async def _jobs(db: store.Store, tenant_id: Any) -> list[dict[str, Any]]:
    async with db.admin() as s:
        cur = await s.conn.execute(
            "select * from public.jobs where tenant_id = %s and schedule_id is not null"
            " order by scheduled_for, schedule_id",
            (tenant_id,),
        )
        return list(await cur.fetchall())


async def test_every_minute_schedules_over_the_budget_skip_visibly(
    client: httpx.AsyncClient, db: store.Store, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    made = []
    for _ in range(3):
        async with db.user(m.claims) as s:
            row = await schedules.create(
                s, tenant_id=m.tenant_id, cron="* * * * *", time_zone="UTC",
                request="check my email", spec=None, planner_configured=False, now=CLOCK,
            )  # fmt: skip
        made.append(row)
    # Three every-minute schedules, a budget of 2 jobs a minute: one occurrence a minute skips.
    for minute in range(1, 4):
        now = CLOCK + timedelta(minutes=minute, seconds=5)
        assert await schedules.fire_due(db, now=now, budget=2) == 3
    jobs = await _jobs(db, m.tenant_id)
    assert len(jobs) == 9  # one job per occurrence, skipped or not
    per_minute = Counter((j["scheduled_for"], j["status"]) for j in jobs)
    for minute in range(1, 4):
        at = CLOCK + timedelta(minutes=minute)
        assert per_minute[(at, "pending")] == 2 and per_minute[(at, "cancelled")] == 1
    skipped = [j for j in jobs if j["status"] == "cancelled"]
    assert all(j["todo_count"] == 0 for j in skipped)  # not queued
    assert all("CPA_SCHEDULE_JOBS_PER_MINUTE = 2" in j["error"] for j in skipped)
    assert all(str(j["created_by"]) == str(m.user_id) for j in jobs)  # the creator's jobs
    async with db.admin() as s:
        ready = await (
            await s.conn.execute(
                "select count(*) as n from public.todos t join public.jobs j on j.id = t.job_id"
                " where j.tenant_id = %s and j.status = 'cancelled'",
                (m.tenant_id,),
            )
        ).fetchone()
        audited = await (
            await s.conn.execute(
                "select count(*) as n from public.audit_log where entity = 'jobs'"
                " and action = 'UPDATE' and after ->> 'status' = 'cancelled'"
                " and after ->> 'error' like 'Skipped:%%' and tenant_id = %s",
                (m.tenant_id,),
            )
        ).fetchone()
    assert ready is not None and ready["n"] == 0
    assert audited is not None and audited["n"] == 3
    # Visible to the user: the job's events end with the skip, the schedule counts its skips.
    job_id = skipped[0]["id"]
    page = (await client.get(f"/v1/jobs/{job_id}/events?after=0&wait=0", headers=bearer(m))).json()
    assert page["done"] and page["events"][-1]["status"] == "cancelled"
    assert "Skipped" in page["events"][-1]["data"]["error"]
    rows = (await client.get("/v1/schedules", headers=bearer(m))).json()["schedules"]
    assert sum(r["skipped_runs"] for r in rows) == 3
    # The next minute has a fresh budget.
    async with db.service() as s:
        fresh = await s.schedule_fire(
            made[0]["id"], CLOCK + timedelta(minutes=9), CLOCK + timedelta(minutes=10), 2
        )
    assert fresh.status == "pending" and fresh.todo_count > 0


async def test_a_fired_job_belongs_to_the_schedules_creator(
    client: httpx.AsyncClient, db: store.Store, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    r = await client.post("/v1/schedules", headers=bearer(m), json=BODY)
    sched = r.json()
    due = datetime.fromisoformat(sched["next_run_at"])
    assert await schedules.fire_due(db, now=due + timedelta(seconds=1)) == 1
    (job,) = await _jobs(db, m.tenant_id)
    assert job["created_by"] == m.user_id and job["status"] == "pending"
