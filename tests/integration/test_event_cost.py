"""Progress events stay complete while costing less (issue 15): no log or broadcast work for
statements that change no status, and a job's events go with the job without a foreign key."""

from __future__ import annotations

import psycopg
from cpa_scheduler import dispatch, store

from tests.conftest import JobFactory, MemberFactory


def _counts(db_url: str) -> tuple[int, int]:
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "select (select count(*) from public.job_events),"
            " (select count(*) from realtime.messages)"
        ).fetchone()
        assert row is not None
        return int(row[0]), int(row[1])


async def test_statements_that_change_no_status_write_no_event_and_send_nothing(
    db_url: str, db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory("A")
    await job_factory(m, [{"key": "a", "action": "noop"}])
    async with db.service() as s:
        [todo] = await s.todo_claim(target="cloud", owner="w1", limit=10)
    before = _counts(db_url)
    async with db.service() as s:
        assert (
            await s.todo_claim(target="cloud", owner="w1", limit=10) == []
        )  # empty claim + lease sweep
        await s.todo_extend([todo.id], "w1", 120.0)  # touches the row, not its status
    assert _counts(db_url) == before


async def test_deleting_a_job_deletes_its_events(
    db_url: str, db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory("A")
    keep = await job_factory(m, [{"key": "a", "action": "noop"}])
    gone = await job_factory(m, [{"key": "a", "action": "noop"}, {"key": "b", "action": "noop"}])
    await dispatch.Dispatcher(db).run_pass(30)
    with psycopg.connect(db_url) as conn:
        count = "select count(*) from public.job_events where job_id = %s"
        # job: pending, running, done; each ToDo: ready, running, done
        assert conn.execute(count, (gone.id,)).fetchone() == (9,)
        conn.execute("delete from public.jobs where id = %s", (gone.id,))
        assert conn.execute(count, (gone.id,)).fetchone() == (0,)
        assert conn.execute(count, (keep.id,)).fetchone() == (6,)
