"""New ToDos and jobs get time-ordered ids (UUID version 7), so the hot indexes stay compact."""

from __future__ import annotations

import asyncio

from cpa_scheduler import store

from tests.conftest import JobFactory, MemberFactory


async def test_new_ids_are_version_7_and_follow_creation_time(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    first = await job_factory(m, [{"key": "a", "action": "noop"}, {"key": "b", "action": "noop"}])
    await asyncio.sleep(0.01)
    second = await job_factory(m)
    async with db.admin() as s:
        cur = await s.conn.execute(
            "select id, job_id from public.todos where job_id = any(%s) order by created_at, key",
            ([first.id, second.id],),
        )
        rows = await cur.fetchall()
    ids = [r["id"] for r in rows]
    assert all(i.version == 7 for i in ids)
    # Later ToDos sort after earlier ones (the first 48 bits are the creation millisecond).
    assert ids[-1] > max(ids[:-1])
    assert [r["job_id"] for r in rows][-1] == second.id
