"""Findings of the review of the merged issue-15 branches (integ), one test each."""

from __future__ import annotations

import psycopg
from cpa_scheduler import store

from tests.conftest import JobFactory, MemberFactory


async def test_retry_of_a_job_cancelled_while_its_todo_ran_runs_it_again(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    """Found first as: a cancel let running ToDos finish, and a retry of a job whose ToDos had
    all finished (or still ran) left it running or pending for good. A cancel now ends the
    running ToDo with the job (migration 20261207002100_terminal_event_last): its late
    completion is dropped, and a retry runs it again to done."""
    m = await member_factory()
    job = await job_factory(m, [{"key": "a", "action": "noop"}])
    async with db.service() as s:
        [a] = await s.todo_claim(target="cloud", owner="w", limit=10)
    async with db.user(m.claims) as s:
        assert (await s.job_cancel(job.id)).status == "cancelled"
    async with db.service() as s:
        item = {"id": str(a.id), "owner": "w", "attempt": a.attempts, "result": {}}
        assert await s.todo_complete([item]) == 0
    async with db.user(m.claims) as s:
        assert (await s.job_retry(job.id)).status == "pending"
    async with db.service() as s:
        [again] = await s.todo_claim(target="cloud", owner="w", limit=10)
        item = {"id": str(again.id), "owner": "w", "attempt": again.attempts, "result": {}}
        assert await s.todo_complete([item]) == 1
    async with db.user(m.claims) as s:
        finished = await s.job_get(job.id)
    assert (finished.status, finished.todos_done) == ("done", 1)


async def test_a_claim_that_skips_starting_a_held_job_leaves_it_pending_for_good(
    db: store.Store, db_url: str, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    """The claims start a claimed ToDo's pending job with FOR UPDATE SKIP LOCKED ("a later
    claim starts it"). When the job row is held at that moment (job_route_v2, the desktop
    sweep, a report on another of its ToDos: FOR NO KEY UPDATE) and no later claim of that job
    comes, its ToDos complete on a 'pending' job, which the completion never finishes."""
    m = await member_factory()
    job = await job_factory(m, [{"key": "a", "action": "noop"}])
    async with await psycopg.AsyncConnection.connect(db_url) as holder:
        await holder.execute(
            "select 1 from public.jobs where id = %s for no key update", (job.id,)
        )  # what job_route_v2 holds for an agent's route message
        async with db.service() as s:
            [a] = await s.todo_claim(target="cloud", owner="w", limit=10)
        await holder.rollback()
    async with db.service() as s:
        item = {"id": str(a.id), "owner": "w", "attempt": a.attempts, "result": {}}
        assert await s.todo_complete([item]) == 1
    async with db.user(m.claims) as s:
        finished = await s.job_get(job.id)
    assert (finished.status, finished.todos_done) == ("done", 1)
