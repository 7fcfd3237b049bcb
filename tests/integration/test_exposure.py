"""No way around the API: what the Data API exposes, and the exploits tried as ``authenticated``.

PostgREST serves the schemas of supabase/config.toml ``[api] schemas`` and lets a signed-in
user call any function there that ``authenticated`` may execute (``POST /rest/v1/rpc/<fn>``).
The tests run SQL exactly as PostgREST would: ``set_config('role', 'authenticated')`` with the
user's claims in the transaction.
"""

from __future__ import annotations

import asyncio
import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
from cpa_scheduler import errors, store

from tests.conftest import JobFactory, Member, MemberFactory

CONFIG = Path(__file__).resolve().parents[2] / "supabase" / "config.toml"


def exposed_schemas() -> list[str]:
    config = tomllib.loads(CONFIG.read_text("utf-8"))
    return list(config["api"]["schemas"])


async def test_no_volatile_function_in_an_exposed_schema_is_executable_by_api_roles(
    db: store.Store,
) -> None:
    schemas = exposed_schemas()
    assert "cpa" not in schemas and "private" not in schemas
    async with db.admin() as s:
        cur = await s.conn.execute(
            """
            select n.nspname || '.' || p.proname || '(' || pg_get_function_identity_arguments(p.oid)
                   || ')' as fn, r.rolname as role
              from pg_proc p
              join pg_namespace n on n.oid = p.pronamespace
              cross join (values ('anon'), ('authenticated')) as r(rolname)
             where n.nspname = any(%(schemas)s) and p.provolatile = 'v' and p.prokind = 'f'
               and has_function_privilege(r.rolname, p.oid, 'execute')
               and not exists (select 1 from pg_depend d
                                where d.objid = p.oid and d.deptype = 'e')
             order by 1, 2
            """,
            {"schemas": schemas},
        )
        exposed = [(r["fn"], r["role"]) for r in await cur.fetchall()]
    assert exposed == [], f"callable through the Data API: {exposed}"


async def test_operations_live_in_cpa_with_their_grants(db: store.Store) -> None:
    async with db.admin() as s:
        cur = await s.conn.execute(
            """
            select p.proname,
                   has_function_privilege('anon', p.oid, 'execute') as anon,
                   has_function_privilege('authenticated', p.oid, 'execute') as authenticated,
                   has_function_privilege('service_role', p.oid, 'execute') as service
              from pg_proc p join pg_namespace n on n.oid = p.pronamespace
             where n.nspname = 'cpa'
            """
        )
        grants = {r["proname"]: r for r in await cur.fetchall()}
        cur = await s.conn.execute(
            "select count(*) as n from pg_proc p join pg_namespace n on n.oid = p.pronamespace"
            " where n.nspname = 'public' and p.proname like '%%\\_v_' escape '\\'"
        )
        row = await cur.fetchone()
        assert row is not None and row["n"] == 0
    for name in ("job_create_v2", "todo_complete_v4", "todo_claim_v3", "job_attach_v1"):
        assert name in grants
    assert not any(g["anon"] for g in grants.values())
    assert all(g["service"] for g in grants.values())
    # The dispatcher's own operations are not for end users.
    for name in ("todo_claim_v3", "todo_snooze_v1", "todo_extend_v2", "job_attach_v1"):
        assert not grants[name]["authenticated"], name


async def _as_user(db: store.Store, member: Member, query: str, params: dict[str, Any]) -> Any:
    async with db.user(member.claims) as s:
        cur = await s.conn.execute(query.encode(), params)  # type: ignore[arg-type]
        return await cur.fetchone()


CREATE = (
    "select * from cpa.job_create_v2(%(t)s, 'x', 'explicit', %(todos)s::jsonb, null, %(prio)s, 3)"
)


def _deep(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = {"a": value}
    return value


BAD_GRAPHS: dict[str, tuple[list[dict[str, Any]], str]] = {
    "cycle": (
        [
            {"key": "a", "action": "noop", "depends_on": ["b"]},
            {"key": "b", "action": "noop", "depends_on": ["a"]},
        ],
        "cycle",
    ),
    "ten thousand todos": (
        [{"key": f"k{i}", "action": "noop"} for i in range(10_000)],
        "at most 1000",
    ),
    "huge key": ([{"key": "k" * 100_000, "action": "noop"}], "key"),
    "unknown action": (
        [{"key": "x", "action": "shell.exec", "target": "desktop", "params": {"cmd": "rm -rf ~"}}],
        "unknown action shell.exec",
    ),
    "mail without confirmation": (
        [
            {
                "key": "m",
                "action": "email.send",
                "target": "desktop",
                "params": {"to": "a@b.c", "subject": "s", "body": "b"},
            }
        ],
        "confirmation",
    ),
    "desktop action in the cloud": (
        [{"key": "o", "action": "desktop.open_app", "params": {"app": "x"}}],
        "runs on desktop",
    ),
    "absurd wait": ([{"key": "w", "action": "wait", "params": {"seconds": 1e12}}], "outside"),
    "absurd timeout": (
        [
            {
                "key": "h",
                "action": "http.request",
                "params": {"url": "https://example.com", "timeout": 1e9},
            }
        ],
        "outside",
    ),
    "unknown param": ([{"key": "w", "action": "wait", "params": {"seconds": 1, "x": 1}}], "x"),
    "deep params": ([{"key": "d", "action": "noop", "params": _deep(300)}], "64 levels"),
    "huge params": (
        [{"key": "d", "action": "noop", "params": {"blob": "x" * 300_000}}],
        "256 KiB",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_GRAPHS))
async def test_direct_job_creation_enforces_the_invariants(
    db: store.Store, member_factory: MemberFactory, case: str
) -> None:
    m = await member_factory()
    todos, expected = BAD_GRAPHS[case]
    params = {"t": str(m.tenant_id), "todos": json.dumps(todos), "prio": 0}
    with pytest.raises(errors.InvalidError) as info:
        with store.translate():
            await _as_user(db, m, CREATE, params)
    assert expected in info.value.message


async def test_direct_job_creation_refuses_absurd_priorities(
    db: store.Store, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    todos = json.dumps([{"key": "a", "action": "noop"}])
    with pytest.raises(errors.InvalidError, match="priority"):
        with store.translate():
            await _as_user(db, m, CREATE, {"t": str(m.tenant_id), "todos": todos, "prio": 10**9})


async def test_the_old_public_functions_are_gone(
    db: store.Store, member_factory: MemberFactory
) -> None:
    import psycopg

    m = await member_factory()
    todos = json.dumps([{"key": "a", "action": "noop"}])
    with pytest.raises(psycopg.errors.UndefinedFunction):
        await _as_user(
            db,
            m,
            "select public.job_create_v1(%(t)s, 'x', 'x', %(todos)s::jsonb)",
            {"t": str(m.tenant_id), "todos": todos},
        )


async def test_a_user_cannot_complete_fail_or_release_the_dispatchers_todo(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    job = await job_factory(m, [{"key": "a", "action": "noop"}, {"key": "b", "action": "noop"}])
    async with db.service() as s:
        rows = await s.todo_claim(target="cloud", owner="dispatcher:abc", limit=10)
    assert len(rows) == 2
    a = rows[0]
    forged: list[dict[str, Any]] = [
        {"id": str(a.id), "result": {"forged": True}},  # no owner: never "any owner"
        {"id": str(a.id), "owner": None, "result": {"forged": True}},
        {"id": str(a.id), "owner": "dispatcher:abc", "result": {"forged": True}},
        {"id": str(a.id), "owner": "agent:dispatcher:abc", "result": {"forged": True}},
    ]
    for item in forged:
        done = await _as_user(db, m, "select cpa.todo_complete_v4(%(i)s::jsonb) as n",
                              {"i": json.dumps([item])})  # fmt: skip
        assert done["n"] == 0, item
        failed = await _as_user(db, m, "select cpa.todo_fail_v2(%(i)s::jsonb) as n",
                                {"i": json.dumps([item | {"error": "x"}])})  # fmt: skip
        assert failed["n"] == 0, item
        released = await _as_user(db, m, "select cpa.todo_release_v2(%(i)s::jsonb) as n",
                                  {"i": json.dumps([item])})  # fmt: skip
        assert released["n"] == 0, item
    # The service role without an owner: nothing either.
    async with db.service() as s:
        assert await s.todo_complete([{"id": str(a.id), "result": 1}]) == 0
        assert await s.todo_release([{"id": str(a.id)}]) == 0
    async with db.user(m.claims) as s:
        todos = {t["key"]: t for t in await s.job_todos(job.id)}
    assert todos["a"]["status"] == "running" and todos["a"]["result"] is None
    assert todos["a"]["lease_owner"] == "dispatcher:abc"


async def test_a_user_still_completes_their_agents_desktop_todo(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    await job_factory(
        m, [{"key": "o", "action": "desktop.open_app", "target": "desktop", "params": {"app": "X"}}]
    )
    async with db.user(m.claims) as s:
        [row] = await s.agent_claim(m.tenant_id, "laptop", ["desktop.open_app"], 5)
        owner = row["lease_owner"]  # the database's agent owner (private.agent_owner_v1)
        n = await s.todo_complete([{"id": str(row["id"]), "owner": owner, "result": {}}])
    assert n == 1


async def test_not_yours_and_not_found_read_the_same(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    import uuid

    a = await member_factory("A")
    b = await member_factory("B")
    job = await job_factory(
        b,
        [
            {
                "key": "m",
                "action": "email.send",
                "target": "desktop",
                "params": {"to": "a@b.c", "subject": "s", "body": "b"},
                "requires_confirmation": True,
            }
        ],
    )
    async with db.service() as s:
        [todo] = await s.job_todos(job.id)
    answers = []
    for todo_id in (str(todo["id"]), str(uuid.uuid4())):
        for call in ("confirm", "note"):
            with pytest.raises(errors.NotFoundError) as info:
                async with db.user(a.claims) as s:
                    if call == "confirm":
                        await s.todo_confirm(todo_id)
                    else:
                        await s.todo_note(todo_id, "agent.agree", {})
            answers.append((call, info.value.message))
    assert answers[:2] == answers[2:]
    async with db.service() as s:
        [todo] = await s.job_todos(job.id)
    assert todo["status"] == "confirming"


async def test_migrate_keeps_the_catalogue_table_equal_to_the_yaml(
    db: store.Store, db_url: str
) -> None:
    from cpa_scheduler import catalogue, migration

    async with db.admin() as s:
        await s.conn.execute("delete from private.catalogue_actions where name = 'email.send'")
        await s.conn.execute(
            "update private.catalogue_actions set requires_confirmation = false, target = 'cloud'"
            " where name = 'file.write'"
        )
    await asyncio.to_thread(migration.apply, db_url)
    async with db.admin() as s:
        cur = await s.conn.execute(
            "select name, target, requires_confirmation from private.catalogue_actions"
        )
        rows = {r["name"]: (r["target"], r["requires_confirmation"]) for r in await cur.fetchall()}
    shipped = catalogue.default().actions
    for name, action in shipped.items():
        assert rows[name] == (action.target, action.requires_confirmation), name
