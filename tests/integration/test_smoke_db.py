"""The data layer end to end on a diamond graph."""

from __future__ import annotations

from cpa_scheduler import store

from tests.conftest import JobFactory, MemberFactory


async def test_diamond_runs_in_order(
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
    seen = []
    for _ in range(4):
        async with db.service() as s:
            claimed = await s.todo_claim(target="cloud", owner="w", limit=10)
            if not claimed:
                break
            seen.append(sorted(r.key for r in claimed))
            await s.todo_complete(
                [
                    {"id": str(r.id), "owner": "w", "attempt": r.attempts, "result": {}}
                    for r in claimed
                ]
            )
    assert seen == [["a"], ["b", "c"], ["d"]]
    async with db.user(m.claims) as s:
        assert (await s.job_get(job.id)).status == "done"
