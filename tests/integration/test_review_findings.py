"""Findings of the review of the merged issue-15 branches (integ), one test each."""

from __future__ import annotations

from cpa_scheduler import store

from tests.conftest import JobFactory, MemberFactory


async def test_retry_of_a_cancelled_job_whose_running_todos_all_finished_ends_done(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    """Cancel lets running ToDos finish; once they are all done, nothing is left to retry.
    job_retry_v2 set such a job 'running' with todos_done = todo_count and nothing ready:
    no completion ever comes to finish it, so it stayed running for good."""
    m = await member_factory()
    job = await job_factory(m, [{"key": "a", "action": "noop"}])
    async with db.service() as s:
        [a] = await s.todo_claim(target="cloud", owner="w", limit=10)
    async with db.user(m.claims) as s:
        assert (await s.job_cancel(job.id)).status == "cancelled"
    async with db.service() as s:
        item = {"id": str(a.id), "owner": "w", "attempt": a.attempts, "result": {}}
        assert await s.todo_complete([item]) == 1
    async with db.user(m.claims) as s:
        retried = await s.job_retry(job.id)
    assert (retried.status, retried.todos_done, retried.todo_count) == ("done", 1, 1)
    assert retried.completed_at is not None
