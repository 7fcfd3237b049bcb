"""Retention: old events and finished jobs go after 30 days, audit entries after 365, and the
audit pruning is itself audited; audit_log stays append-only for every API role."""

from __future__ import annotations

import pytest
from cpa_scheduler import dispatch, errors, store

from tests.conftest import JobFactory, MemberFactory


async def test_prune_old_events_jobs_and_audit(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    old = await job_factory(m, [{"key": "a", "action": "noop"}])
    recent = await job_factory(m, [{"key": "a", "action": "noop"}])
    running = await job_factory(m, [{"key": "a", "action": "wait", "params": {"seconds": 600}}])
    await dispatch.Dispatcher(db).run_pass(10)
    async with db.admin() as s:
        await s.conn.execute(
            "update public.jobs set completed_at = now() - interval '40 days',"
            " created_at = now() - interval '41 days' where id = any(%s)",
            ([old.id, running.id],),
        )
        await s.conn.execute(
            "update public.job_events set created_at = now() - interval '40 days'"
            " where job_id = %s",
            (recent.id,),
        )
        await s.conn.execute(
            "insert into public.audit_log (action, entity, created_at)"
            " values ('INSERT', 'ancient', now() - interval '400 days')"
        )
    d = dispatch.Dispatcher(db)
    pruned = await d.maybe_prune()
    assert pruned is not None
    assert pruned["jobs"] == 1 and pruned["audit_log"] == 1 and pruned["job_events"] >= 1
    assert await d.maybe_prune() is None  # at most once per retention_every
    async with db.service() as s:
        ids = {str(j.id) for j in await s.job_list(tenant_id=m.tenant_id)}
        cur = await s.conn.execute(
            "select entity, before from public.audit_log where entity in ('ancient', 'audit_log')"
        )
        audit = await cur.fetchall()
    # The unfinished job stays whatever its age; the recent one keeps its row.
    assert ids == {str(recent.id), str(running.id)}
    assert [a["entity"] for a in audit] == ["audit_log"]
    assert audit[0]["before"]["pruned"] == 1


@pytest.mark.parametrize("scope", ["service", "user"])
async def test_audit_log_stays_append_only_for_api_roles(
    db: store.Store, member_factory: MemberFactory, scope: str
) -> None:
    m = await member_factory()
    with pytest.raises(errors.NotFoundError, match="permission denied for table audit_log"):
        async with db.service() if scope == "service" else db.user(m.claims) as s:
            await s.conn.execute("select set_config('cpa.audit_prune', 'on', true)")
            await s.conn.execute("delete from public.audit_log")
