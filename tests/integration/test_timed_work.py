"""Timed and recurring work against real Postgres: run_at, schedules, catch-up, waiting agents."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cpa_scheduler import dispatch, errors, intake, schedules, store, times

from tests.conftest import JobFactory, Member, MemberFactory


async def claim(db: store.Store, target: str = "cloud") -> list[dict[str, Any]]:
    async with db.service() as s:
        rows = await s.todo_claim(target=target, owner="test", limit=100)
    return [dataclasses.asdict(r) for r in rows]  # these tests read the columns by name


async def test_run_at_is_not_claimed_early(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    at = datetime.now(UTC) + timedelta(seconds=1.5)
    job = await job_factory(m, [{"key": "a", "action": "noop"}], run_at=at)
    assert job.run_at == at
    assert await claim(db) == []
    async with db.user(m.claims) as s:
        (todo,) = await s.job_todos(job.id)
    assert todo["run_at"] == at and todo["run_after"] >= at
    await asyncio.sleep((at - datetime.now(UTC)).total_seconds() + 0.05)
    (row,) = await claim(db)
    async with db.service() as s:
        assert (await s.todo_get(row["id"]))["started_at"] >= at


async def test_a_dependent_keeps_its_run_at_when_released(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    job = await job_factory(m, [
        {"key": "a", "action": "noop"},
        {"key": "b", "action": "noop", "depends_on": ["a"], "run_at": later},
    ])  # fmt: skip
    summary = await dispatch.Dispatcher(db).run_pass(10)
    assert summary.done == 1  # a ran; b is ready but held until its run_at
    async with db.user(m.claims) as s:
        todos = {t["key"]: t for t in await s.job_todos(job.id)}
    assert todos["b"]["status"] == "ready"
    assert todos["b"]["run_after"] == datetime.fromisoformat(later)


async def test_job_run_at_in_the_past_is_refused(
    db: store.Store, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    async with db.user(m.claims) as s:
        with pytest.raises(errors.InvalidError, match="in the past"):
            await intake.submit(
                s, tenant_id=m.tenant_id, text="check my email",
                run_at=datetime.now(UTC) - timedelta(minutes=5),
            )  # fmt: skip


async def test_reminder_is_a_cloud_notification_that_needs_no_agent(
    db: store.Store, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    async with db.user(m.claims) as s:
        job = await intake.submit(
            s, tenant_id=m.tenant_id, text="Erinnere mich in 10 Minuten an den Tee",
            time_zone="Europe/Berlin",
        )  # fmt: skip
        todos = await s.job_todos(job.id)
    assert [t["action"] for t in todos] == ["notify"]  # no agent offers reminder.create
    delta = todos[0]["run_at"] - datetime.now(UTC)
    assert timedelta(minutes=9) < delta <= timedelta(minutes=10)
    # Move the clock instead of sleeping: the reminder comes due.
    async with db.admin() as s:
        await s.conn.execute(
            "update public.todos set run_at = now(), run_after = now() where job_id = %s",
            (job.id,),
        )
    summary = await dispatch.Dispatcher(db).run_pass(10)
    assert summary.done == 1
    async with db.user(m.claims) as s:
        assert (await s.job_get(job.id)).status == "done"
        kinds = [e["kind"] for e in await s.event_list(job.id)]
    assert "notification" in kinds


async def test_reminder_also_goes_to_an_agent_that_offers_it(
    db: store.Store, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    async with db.user(m.claims) as s:  # the user's own agent: their desktop ToDos go to it
        await s.agent_upsert(m.tenant_id, "laptop", "Laptop", ["reminder.create"])
    async with db.user(m.claims) as s:
        job = await intake.submit(
            s, tenant_id=m.tenant_id, text="Remind me tomorrow at 9am to call Anna",
            time_zone="America/New_York",
        )  # fmt: skip
        todos = {t["key"]: t for t in await s.job_todos(job.id)}
    assert todos["remind"]["action"] == "notify"
    assert todos["native"]["action"] == "reminder.create"
    assert todos["native"]["run_at"] is None  # delivered now, fired by the desktop itself
    at = datetime.fromisoformat(todos["native"]["params"]["at"])
    assert at == todos["remind"]["run_at"] and at.utcoffset() in (
        timedelta(hours=-5),
        timedelta(hours=-4),
    )
    assert todos["native"]["optional"] and todos["native"]["agent_timeout_seconds"] == 60
    # The agent went away: at its timeout the native copy is skipped, the job does not fail.
    async with db.admin() as s:
        await s.conn.execute(
            "update public.todos set run_after = now() - interval '61 seconds' where id = %s",
            (todos["native"]["id"],),
        )
    async with db.service() as s:
        await s.desktop_sweep()
    async with db.user(m.claims) as s:
        after = {t["key"]: t for t in await s.job_todos(job.id)}
        assert (await s.job_get(job.id)).status in ("pending", "running")
    assert after["native"]["status"] == "done" and after["native"]["result"]["skipped"] is True
    assert after["remind"]["status"] == "ready"  # still waiting for tomorrow 9am


async def _schedule(db: store.Store, m: Member, cron: str, **kw: Any) -> dict[str, Any]:
    async with db.user(m.claims) as s:
        return await schedules.create(
            s, tenant_id=m.tenant_id, cron=cron, time_zone=kw.get("tz", "Europe/Berlin"),
            request=kw.get("request", "check my email"), spec=None, planner_configured=False,
            now=kw.get("now"),
        )  # fmt: skip


async def _jobs_of(db: store.Store, schedule_id: Any) -> list[dict[str, Any]]:
    async with db.admin() as s:
        cur = await s.conn.execute(
            "select * from public.jobs where schedule_id = %s order by scheduled_for",
            (schedule_id,),
        )
        return list(await cur.fetchall())


async def test_a_schedule_fires_exactly_once_under_three_concurrent_passes(
    db: store.Store, db_url: str, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    sched = await _schedule(db, m, "*/5 * * * *")
    occurrence = sched["next_run_at"]
    stores = [store.Store(db_url, max_size=2) for _ in range(3)]
    try:
        fired = await asyncio.gather(
            *(schedules.fire_due(one, now=occurrence + timedelta(seconds=1)) for one in stores)
        )
    finally:
        for one in stores:
            await one.close()
    assert sum(fired) == 1
    (job,) = await _jobs_of(db, sched["id"])
    assert job["scheduled_for"] == occurrence and job["intent"] == "check_email"
    async with db.user(m.claims) as s:
        again = await s.schedule_get(sched["id"])
    assert again["next_run_at"] == occurrence + timedelta(minutes=5)
    assert again["last_job_id"] == job["id"]


async def test_catch_up_after_a_ten_minute_outage_runs_the_missed_occurrence_once(
    db: store.Store, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    start = datetime.now(UTC).replace(second=0, microsecond=0)
    sched = await _schedule(db, m, "* * * * *", now=start)
    assert sched["next_run_at"] == start + timedelta(minutes=1)
    # The dispatcher was down for ten minutes: "now" moves on, nobody sleeps.
    back = start + timedelta(minutes=10, seconds=30)
    assert await schedules.fire_due(db, now=back) == 1
    assert await schedules.fire_due(db, now=back) == 0
    (job,) = await _jobs_of(db, sched["id"])
    assert job["scheduled_for"] == start + timedelta(minutes=10)  # the latest missed slot
    async with db.user(m.claims) as s:
        row = await s.schedule_get(sched["id"])
    assert row["next_run_at"] == start + timedelta(minutes=11)


async def test_paused_schedules_do_not_fire_and_resume_skips_the_pause(
    db: store.Store, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    sched = await _schedule(db, m, "* * * * *")
    async with db.user(m.claims) as s:
        await s.schedule_pause(sched["id"], paused=True)
    later = sched["next_run_at"] + timedelta(minutes=5)
    assert await schedules.fire_due(db, now=later) == 0
    async with db.user(m.claims) as s:
        resumed = await schedules.resume(s, sched["id"])
    assert not resumed["paused"] and resumed["next_run_at"] > datetime.now(UTC)


async def test_another_tenants_schedule_is_not_found(
    db: store.Store, member_factory: MemberFactory
) -> None:
    a, b = await member_factory("A"), await member_factory("B")
    sched = await _schedule(db, a, "0 8 * * 1")
    for attempt in (
        lambda s: s.schedule_get(sched["id"]),
        lambda s: s.schedule_pause(sched["id"], paused=True),
        lambda s: s.schedule_delete(sched["id"]),
    ):
        with pytest.raises(errors.NotFoundError):
            async with db.user(b.claims) as s:
                await attempt(s)
    async with db.admin() as s:
        cur = await s.conn.execute(
            "select action from public.audit_log where entity = 'schedules' and entity_id = %s",
            (str(sched["id"]),),
        )
        assert [r["action"] for r in await cur.fetchall()] == ["INSERT"]


async def test_scheduled_requests_cannot_name_their_own_time(
    db: store.Store, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    with pytest.raises(errors.InvalidError, match="cannot name its own time"):
        await _schedule(db, m, "0 8 * * *", request="erinnere mich in 10 Minuten an den Tee")


async def test_a_recurring_request_creates_a_schedule(
    db: store.Store, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    async with db.user(m.claims) as s:
        job = await intake.submit(
            s, tenant_id=m.tenant_id, text="Jeden Montag um 8 Uhr erinnere mich an den Müll",
            time_zone="Europe/Berlin",
        )  # fmt: skip
        (row,) = await s.schedule_list(m.tenant_id)
    assert job.intent == "schedule"
    assert row["cron"] == "0 8 * * 1" and row["request"] == "erinnere mich an den Müll"
    first = row["next_run_at"].astimezone(times.zone("Europe/Berlin"))
    assert (first.weekday(), first.hour, first.minute) == (0, 8, 0)


async def test_desktop_todo_without_agent_is_announced_and_times_out(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    job = await job_factory(m, [
        {"key": "open", "action": "desktop.open_app", "target": "desktop",
         "params": {"app": "Spotify"}, "agent_timeout": 60},
    ])  # fmt: skip
    async with db.service() as s:
        assert await s.desktop_sweep() == 1
        assert await s.desktop_sweep() == 0  # announced once
    async with db.user(m.claims) as s:
        events = [e for e in await s.event_list(job.id) if e["kind"] == "todo.waiting_for_agent"]
    assert events[0]["data"]["message"] == "waiting for an agent offering desktop.open_app"
    # Move the clock past the agent timeout.
    async with db.admin() as s:
        await s.conn.execute(
            "update public.todos set run_after = now() - interval '61 seconds' where job_id = %s",
            (job.id,),
        )
    async with db.service() as s:
        assert await s.desktop_sweep() == 1
    async with db.user(m.claims) as s:
        failed = await s.job_get(job.id)
    assert failed.status == "failed"
    assert "No agent offering desktop.open_app" in failed.error


async def test_long_running_mode_wakes_when_a_timer_comes_due(
    db: store.Store, db_url: str, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    base = datetime.now(UTC) + timedelta(seconds=0.5)
    jobs = [
        await job_factory(
            m, [{"key": "t", "action": "noop"}], run_at=base + timedelta(seconds=i / 4)
        )
        for i in range(5)
    ]
    stop = asyncio.Event()
    # A long sweep interval: only the alarm can start these on time.
    dispatcher = dispatch.Dispatcher(db, alarm_interval=5.0)
    worker = asyncio.create_task(dispatcher.run_forever(db_url, stop=stop, sweep_interval=30.0))
    try:
        for _ in range(60):
            await asyncio.sleep(0.1)
            async with db.user(m.claims) as s:
                rows = [(await s.job_todos(j.id))[0] for j in jobs]
            if all(r["status"] == "done" for r in rows):
                break
    finally:
        stop.set()
        await worker
    lateness = [(r["started_at"] - r["run_at"]).total_seconds() for r in rows]
    assert all(r["status"] == "done" for r in rows)
    assert max(lateness) < 1.0, lateness


async def test_a_retried_desktop_todo_is_announced_again(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    job = await job_factory(m, [{"key": "open", "action": "desktop.open_app", "target": "desktop",
                                 "params": {"app": "Spotify"}}])  # fmt: skip
    async with db.service() as s:
        assert await s.desktop_sweep() == 1
    async with db.user(m.claims) as s:
        await s.job_cancel(job.id)
    async with db.user(m.claims) as s:
        await s.job_retry(job.id)
    async with db.service() as s:
        assert await s.desktop_sweep() == 1
