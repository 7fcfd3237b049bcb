"""RLS matrix: every table x {anon, member A, member B, service role} x {select, insert, update, delete}."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from cpa_scheduler import store

from tests.conftest import JobFactory, Member, MemberFactory

TABLES = [
    "tenants",
    "memberships",
    "jobs",
    "todos",
    "todo_edges",
    "job_events",
    "audit_log",
    "agents",
    "schedules",
]
OPS = ["select", "insert", "update", "delete"]
# Cells that succeed; everything else returns no rows or raises a permission error.
ALLOWED = {
    ("member_a", "select"): set(TABLES),
    ("service", "select"): set(TABLES),
    ("service", "insert"): {
        "tenants",
        "memberships",
        "jobs",
        "todos",
        "todo_edges",
        "job_events",
        "agents",
        "schedules",
    },
    ("service", "update"): {
        "tenants",
        "memberships",
        "jobs",
        "todos",
        "todo_edges",
        "agents",
        "schedules",
    },
    ("service", "delete"): {
        "tenants",
        "memberships",
        "jobs",
        "todos",
        "todo_edges",
        "agents",
        "schedules",
    },
}


async def _seed(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> tuple[Member, Member]:
    a = await member_factory("A")
    b = await member_factory("B")
    for m in (a, b):
        await job_factory(
            m,
            [
                {"key": "x", "action": "noop"},
                {"key": "y", "action": "noop", "depends_on": ["x"]},
                {"key": "z", "action": "noop"},
            ],
        )
        async with db.service() as s:
            await s.agent_upsert(m.tenant_id, "laptop", "Laptop", ["desktop.open_app"])
            await s.schedule_create(
                tenant_id=m.tenant_id, cron="0 8 * * *", time_zone="Europe/Berlin",
                request="check my email", graph=None, intent="check_email",
                todos=[{"key": "a", "action": "noop"}], next_run_at=datetime.now(UTC),
            )  # fmt: skip
    return a, b


def _statement(table: str, op: str, tenant: uuid.UUID) -> tuple[str, dict[str, Any]]:
    t = str(tenant)
    if op == "select":
        return f"select count(*) as n from public.{table} where {_tenant_col(table)} = %(t)s", {
            "t": t
        }
    if op == "delete":
        return (
            f"with d as (delete from public.{table} where {_tenant_col(table)} = %(t)s returning 1) select count(*) as n from d",
            {"t": t},
        )
    if op == "update":
        col = {
            "tenants": "name",
            "memberships": "role",
            "jobs": "intent",
            "todos": "action",
            "todo_edges": "tenant_id",
            "job_events": "kind",
            "audit_log": "entity",
            "agents": "name",
            "schedules": "request",
        }[table]
        value = {"memberships": "admin", "todo_edges": t}.get(table, "changed")
        return (
            f"with u as (update public.{table} set {col} = %(v)s where {_tenant_col(table)} = %(t)s returning 1) "
            "select count(*) as n from u",
            {"t": t, "v": value},
        )
    rows = {
        "tenants": ("id, name", "gen_random_uuid(), 'new'"),
        "memberships": (
            "tenant_id, user_id",
            "%(t)s, (select u.id from auth.users u where u.id not in (select m.user_id from public.memberships m where m.tenant_id = %(t)s) limit 1)",
        ),
        "jobs": ("tenant_id, status", "%(t)s, 'pending'"),
        "todos": (
            "tenant_id, job_id, key, action, target",
            "%(t)s, (select id from public.jobs where tenant_id = %(t)s limit 1), 'new', 'noop', 'cloud'",
        ),
        "todo_edges": (
            "tenant_id, todo_id, depends_on_id",
            "%(t)s, (select id from public.todos where tenant_id = %(t)s and key = 'x' limit 1), (select id from public.todos where tenant_id = %(t)s and key = 'x' and false)",
        ),
        "job_events": (
            "tenant_id, job_id, kind",
            "%(t)s, (select id from public.jobs where tenant_id = %(t)s limit 1), 'x'",
        ),
        "audit_log": ("tenant_id, action, entity", "%(t)s, 'INSERT', 'x'"),
        "agents": ("tenant_id, agent_key", "%(t)s, 'new-agent'"),
        "schedules": (
            "tenant_id, cron, request, todos, next_run_at",
            '%(t)s, \'0 8 * * *\', \'x\', \'[{"key": "a", "action": "noop"}]\', now()',
        ),
    }[table]
    if table == "todo_edges":
        # A new edge between two existing ToDos of the tenant (z now depends on x; no cycle).
        return (
            "with i as (insert into public.todo_edges (tenant_id, todo_id, depends_on_id) "
            "select %(t)s, z.id, x.id from public.todos x join public.todos z on z.job_id = x.job_id "
            "where x.tenant_id = %(t)s and x.key = 'x' and z.key = 'z' returning 1) select count(*) as n from i",
            {"t": t},
        )
    return (
        f"with i as (insert into public.{table} ({rows[0]}) values ({rows[1]}) returning 1) select count(*) as n from i",
        {"t": t},
    )


def _tenant_col(table: str) -> str:
    return "id" if table == "tenants" else "tenant_id"


async def _run(
    db_url: str, who: str, a: Member, b: Member, sql: str, params: dict[str, Any]
) -> int | str:
    async with await psycopg.AsyncConnection.connect(db_url, prepare_threshold=None) as conn:
        try:
            async with conn.transaction():
                if who == "anon":
                    await conn.execute(
                        "select set_config('role', 'anon', true), set_config('request.jwt.claims', '{\"role\":\"anon\"}', true)"
                    )
                elif who == "service":
                    await conn.execute("select set_config('role', 'service_role', true)")
                else:
                    m = a if who == "member_a" else b
                    claims = json.dumps({"sub": str(m.user_id), "role": "authenticated"})
                    await conn.execute(
                        "select set_config('role', 'authenticated', true), set_config('request.jwt.claims', %s, true)",
                        (claims,),
                    )
                cur = await conn.execute(sql, params)  # type: ignore[arg-type]
                row = await cur.fetchone()
                assert row is not None
                n = int(row[0])
                raise _Rollback(n)
        except _Rollback as rb:
            return rb.n
        except psycopg.errors.InsufficientPrivilege:
            return "denied"


class _Rollback(Exception):
    def __init__(self, n: int) -> None:
        self.n = n


@pytest.mark.parametrize("table", TABLES)
async def test_rls_matrix(
    table: str, db: store.Store, db_url: str, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    a, b = await _seed(db, member_factory, job_factory)
    results: dict[tuple[str, str], int | str] = {}
    for who in ["anon", "member_a", "member_b", "service"]:
        for op in OPS:
            sql, params = _statement(table, op, a.tenant_id)  # always aimed at tenant A's rows
            results[(who, op)] = await _run(db_url, who, a, b, sql, params)
    for (who, op), outcome in results.items():
        allowed = table in ALLOWED.get((who, op), set())
        if allowed:
            assert isinstance(outcome, int) and outcome > 0, (table, who, op, outcome)
        else:
            assert outcome == "denied" or outcome == 0, (table, who, op, outcome)


async def test_member_sees_only_own_tenant(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    a, b = await _seed(db, member_factory, job_factory)
    async with db.user(a.claims) as s:
        jobs = await s.job_list()
    assert {j.tenant_id for j in jobs} == {a.tenant_id}
    async with db.user(b.claims) as s:
        with pytest.raises(Exception, match="not found|Not found|does not exist"):
            await s.job_get(jobs[0].id)


async def test_user_cannot_create_a_job_in_another_tenant(
    db: store.Store, member_factory: MemberFactory
) -> None:
    a = await member_factory("A")
    b = await member_factory("B")
    from cpa_scheduler import errors

    async with db.user(a.claims) as s:
        with pytest.raises(errors.NotFoundError):
            await s.job_create(tenant_id=b.tenant_id, todos=[{"key": "x", "action": "noop"}])


async def test_audit_log_is_append_only_even_for_service(
    db: store.Store, db_url: str, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    a = await member_factory("A")
    await job_factory(a)
    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        n = await (await conn.execute("select count(*) from public.audit_log")).fetchone()
        assert n is not None and n[0] > 0
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
            await conn.execute("delete from public.audit_log")


async def test_realtime_topic_is_private_to_members(
    db: store.Store, db_url: str, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    a = await member_factory("A")
    b = await member_factory("B")
    await job_factory(a)
    topic = f"tenant:{a.tenant_id}"
    for m, expected in ((a, True), (b, False)):
        async with await psycopg.AsyncConnection.connect(db_url) as conn, conn.transaction():
            claims = json.dumps({"sub": str(m.user_id), "role": "authenticated"})
            await conn.execute(
                "select set_config('role', 'authenticated', true), set_config('request.jwt.claims', %s, true),"
                " set_config('realtime.topic', %s, true)",
                (claims, topic),
            )
            cur = await conn.execute(
                "select count(*) from realtime.messages where topic = %s", (topic,)
            )
            row = await cur.fetchone()
            assert row is not None
            assert (row[0] > 0) is expected


async def test_bootstrap_again_keeps_the_grants(
    db: store.Store,
    db_url: str,
    pg_server: Any,
    member_factory: MemberFactory,
    job_factory: JobFactory,
) -> None:
    """Local mode re-runs the bootstrap on every start; it must not undo the migrations."""
    from cpa_scheduler import migration
    from psycopg.conninfo import conninfo_to_dict

    a = await member_factory("A")
    await job_factory(a)
    migration.bootstrap(pg_server.admin(str(conninfo_to_dict(db_url)["dbname"])))
    async with db.user(a.claims) as s:
        assert len(await s.job_list()) == 1
        assert await s.my_tenants() == [a.tenant_id]
