"""job_events (by day) and audit_log (by month) are partitioned: partitions are made ahead,
an insert at any time finds one, retention drops whole partitions, and readers do not see the
seams."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from cpa_scheduler import dispatch, errors, migration, store

from tests.conftest import JobFactory, MemberFactory, Server


@pytest.fixture
def db_url(pg_server: Server, template_db: str) -> Iterator[str]:
    """A database migrated now, not a clone of the session's template: the migration makes the
    partitions of the days after the one it runs on, and a session may cross midnight."""
    name = f"cpa_p_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server.admin("postgres"), autocommit=True) as conn:
        conn.execute(f'create database "{name}" owner "{pg_server.app_user}"')
    try:
        migration.bootstrap(pg_server.admin(name))
        migration.apply(pg_server.url(name))
        yield pg_server.url(name)
    finally:
        with psycopg.connect(pg_server.admin("postgres"), autocommit=True) as conn:
            conn.execute(f'drop database if exists "{name}" with (force)')


def _midnight(days: int) -> datetime:
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return today + timedelta(days=days)


async def _rows(db: store.Store, sql: str, *params: Any) -> list[dict[str, Any]]:
    async with db.admin() as s:
        cur = await s.conn.execute(sql, params)
        return list(await cur.fetchall())


async def _partitions(db: store.Store, parent: str) -> dict[str, dict[str, Any]]:
    rows = await _rows(db, "select * from private.partition_bounds_v1(%s::regclass)", parent)
    return {str(r["part"]): r for r in rows}


async def _retire_legacy(db: store.Store) -> None:
    """The state a month after the migration: the legacy partitions are gone."""
    async with db.admin() as s:
        for table in ("job_events", "audit_log"):
            await s.conn.execute(
                f"alter table public.{table} detach partition private.{table}_legacy"
            )
            await s.conn.execute(f"drop table private.{table}_legacy")


async def _partition(db: store.Store, parent: str, name: str, lo: datetime, hi: datetime) -> None:
    async with db.admin() as s:
        await s.conn.execute(
            "select private.partition_create_v1(%s::regclass, %s, %s, %s)", (parent, name, lo, hi)
        )


async def test_partitions_are_created_ahead_and_only_once(db: store.Store) -> None:
    parts = await _partitions(db, "public.job_events")
    # The migration made the next seven days (the legacy partition holds up to tomorrow).
    for day in range(1, 8):
        name = f"private.job_events_p{_midnight(day):%Y%m%d}"
        assert name in parts, sorted(parts)
        assert parts[name]["lower_bound"] == _midnight(day)
        assert parts[name]["upper_bound"] == _midnight(day + 1)
    assert parts["private.job_events_default"]["is_default"]
    assert parts["private.job_events_legacy"]["lower_bound"] is None
    async with db.service() as s:
        cur = await s.conn.execute("select cpa.partitions_ensure_v1(10) as n")
        assert (await cur.fetchone())["n"] == 3
        cur = await s.conn.execute("select cpa.partitions_ensure_v1(10) as n")
        assert (await cur.fetchone())["n"] == 0
    assert f"private.job_events_p{_midnight(10):%Y%m%d}" in await _partitions(
        db, "public.job_events"
    )


async def test_an_insert_at_a_boundary_and_beyond_the_partitions_finds_a_home(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    job = await job_factory(m)
    edge = _midnight(3)
    far = _midnight(30) + timedelta(hours=5)
    times = [edge - timedelta(microseconds=1), edge, far]
    async with db.admin() as s:
        for at in times:
            await s.conn.execute(
                "insert into public.job_events (tenant_id, job_id, kind, created_at)"
                " values (%s, %s, 'test.edge', %s)",
                (m.tenant_id, job.id, at),
            )
    homes = await _rows(
        db,
        "select created_at, tableoid::regclass::text as part from public.job_events"
        " where kind = 'test.edge' order by created_at",
    )
    assert [h["part"] for h in homes] == [
        f"private.job_events_p{_midnight(2):%Y%m%d}",
        f"private.job_events_p{edge:%Y%m%d}",
        "private.job_events_default",  # no partition that far ahead: the default takes it
    ]
    # Creating that day's partition moves the row out of the default partition.
    async with db.service() as s:
        await s.conn.execute("select cpa.partitions_ensure_v1(31)")
    (moved,) = await _rows(
        db,
        "select tableoid::regclass::text as part from public.job_events where created_at = %s",
        far,
    )
    assert moved["part"] == f"private.job_events_p{far:%Y%m%d}"


async def test_events_read_and_resume_across_a_partition_boundary(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    other = await member_factory()
    job = await job_factory(m)
    edge = _midnight(2)
    async with db.admin() as s:
        for i, at in enumerate([edge - timedelta(seconds=2), edge - timedelta(milliseconds=1),
                                edge, edge + timedelta(seconds=1)]):  # fmt: skip
            await s.conn.execute(
                "insert into public.job_events (tenant_id, job_id, kind, data, created_at)"
                " values (%s, %s, 'test.seam', %s, %s)",
                (m.tenant_id, job.id, f'{{"n": {i}}}', at),
            )
    async with db.user(m.claims) as s:
        seam = [e for e in await s.event_list(job.id) if e["kind"] == "test.seam"]
        assert [e["data"]["n"] for e in seam] == [0, 1, 2, 3]
        # Resume after the second event: the rest, in order, from the next day's partition.
        rest = await s.event_list(job.id, after_id=seam[1]["id"])
        assert [e["data"]["n"] for e in rest if e["kind"] == "test.seam"] == [2, 3]
    # Row level security holds on every partition: another tenant's member reads nothing.
    async with db.user(other.claims) as s:
        assert await s.event_list(job.id) == []
        cur = await s.conn.execute("select count(*) as n from public.job_events")
        assert (await cur.fetchone())["n"] == 0
    with pytest.raises(errors.NotFoundError, match="permission denied"):
        async with db.user(other.claims) as s:
            await s.conn.execute(f"select * from private.job_events_p{edge:%Y%m%d}")


async def test_retention_drops_whole_partitions_and_then_the_jobs_they_held(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    await _retire_legacy(db)
    old_day = _midnight(-40)
    await _partition(db, "public.job_events", f"job_events_p{old_day:%Y%m%d}", old_day,
                     old_day + timedelta(days=1))  # fmt: skip
    await _partition(db, "public.job_events", f"job_events_p{_midnight(0):%Y%m%d}",
                     _midnight(0), _midnight(1))  # fmt: skip
    month = (_midnight(-400)).replace(day=1)
    await _partition(db, "public.audit_log", f"audit_log_p{month:%Y%m}", month,
                     (month + timedelta(days=32)).replace(day=1))  # fmt: skip
    m = await member_factory()
    old = await job_factory(m)
    recent = await job_factory(m)
    await dispatch.Dispatcher(db).run_pass(10)
    async with db.admin() as s:
        await s.conn.execute(
            "update public.jobs set completed_at = %s, created_at = %s where id = %s",
            (old_day + timedelta(hours=2), old_day + timedelta(hours=1), old.id),
        )
        for at in (old_day + timedelta(hours=1), old_day + timedelta(hours=2)):
            await s.conn.execute(
                "insert into public.job_events (tenant_id, job_id, kind, created_at)"
                " values (%s, %s, 'test.old', %s)",
                (m.tenant_id, old.id, at),
            )
        await s.conn.execute(
            "insert into public.audit_log (action, entity, created_at)"
            " values ('INSERT', 'ancient', %s)",
            (month + timedelta(days=3),),
        )
    d = dispatch.Dispatcher(db)
    pruned = await d.maybe_prune()
    assert pruned is not None
    assert pruned["partitions_dropped"] == 2
    assert pruned["job_events"] == 2 and pruned["audit_log"] == 1
    assert pruned["jobs"] == 1  # its events' partition is gone, so the job goes too
    parts = await _partitions(db, "public.job_events")
    assert f"private.job_events_p{old_day:%Y%m%d}" not in parts
    async with db.service() as s:
        ids = {j.id for j in await s.job_list(tenant_id=m.tenant_id)}
        cur = await s.conn.execute("select count(*) as n from public.job_events where job_id = %s",
                                   (recent.id,))  # fmt: skip
        assert (await cur.fetchone())["n"] > 0
        cur = await s.conn.execute("select before from public.audit_log where entity = 'audit_log'")
        (entry,) = await cur.fetchall()
    assert ids == {recent.id}
    # The pruning is itself audited, naming the partition it dropped.
    assert entry["before"]["pruned"] == 1
    assert entry["before"]["partitions"][0]["partition"] == f"private.audit_log_p{month:%Y%m}"


async def test_jobs_wait_for_the_partition_of_their_events(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    """A job past the cutoff whose events' day is not yet wholly past it stays, so its events
    go with their partition and never row by row."""
    m = await member_factory()
    job = await job_factory(m)
    await dispatch.Dispatcher(db).run_pass(10)
    await _retire_legacy(db)
    day = _midnight(-30)
    await _partition(db, "public.job_events", f"job_events_p{day:%Y%m%d}", day,
                     day + timedelta(days=1))  # fmt: skip
    async with db.admin() as s:
        await s.conn.execute(
            "update public.jobs set completed_at = %s where id = %s",
            # Past the cutoff (now - 30 days), inside the partition's day.
            (day + (datetime.now(UTC) - _midnight(0)) / 2, job.id),
        )
    async with db.service() as s:
        pruned = await s.retention_prune(job_days=30, audit_days=365)
    assert pruned["jobs"] == 0 and pruned["partitions_dropped"] == 0


async def test_audit_partitions_stay_append_only(
    db: store.Store, member_factory: MemberFactory
) -> None:
    await member_factory()  # writes audit entries
    for sql in ("update public.audit_log set entity = 'x'", "delete from public.audit_log",
                "truncate public.audit_log"):  # fmt: skip
        with pytest.raises(errors.CpaError, match="append-only|permission denied"):
            async with db.admin() as s:
                await s.conn.execute(sql)
    (part,) = await _rows(db, "select tableoid::regclass::text as p from public.audit_log limit 1")
    for sql in (f"delete from {part['p']}", f"truncate {part['p']}"):
        with pytest.raises(errors.CpaError, match="append-only"):
            async with db.admin() as s:
                await s.conn.execute(sql)


async def test_a_sweep_runs_retention_batches_while_they_come_back_full(
    db: store.Store, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    async with db.admin() as s:
        await s.conn.execute(
            "insert into public.jobs (tenant_id, status, created_at, completed_at)"
            " select %s, 'done', now() - interval '41 days', now() - interval '40 days'"
            " from generate_series(1, 1200)",
            (m.tenant_id,),
        )
    pruned = await dispatch.Dispatcher(db).maybe_prune()
    assert pruned is not None and pruned["jobs"] == 1200  # three batches of at most 500
