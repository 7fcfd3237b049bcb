"""POST /v1/jobs writes its new job's events itself (migration 20261128000800, issue 15).

``cpa.job_submit_v3`` inserts the events of the job it creates (the job's, then its ToDos' in
id order) into ``job_events`` with their final ids and sends their one Realtime broadcast in
its own transaction, instead of staging them for the commit-time flush. The rows, their order
and the broadcast must be what a keyed request (its job made by ``cpa.job_create_v2``, the events
staged and flushed at commit) produces; nothing may stay staged; a rolled-back call
leaves nothing; anything later in the same transaction is staged as before.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any

import psycopg
import pytest
from cpa_scheduler import errors, store

from tests import events_contract
from tests.conftest import Member, MemberFactory

GRAPH = [
    {"key": "a", "action": "noop"},
    {"key": "b", "action": "noop", "depends_on": ["a"]},
    {"key": "c", "action": "noop", "depends_on": ["a"]},
    {"key": "d", "action": "desktop.open_app", "target": "desktop", "params": {"app": "X"},
     "depends_on": ["b", "c"]},
    {"key": "e", "action": "email.send", "target": "desktop", "requires_confirmation": True,
     "params": {"to": "a@b.c", "subject": "s", "body": "b"}},
]  # fmt: skip


def _call(path: str, rate_limit: int | None = None) -> str:
    """``path`` "direct" (no key: v3 writes the events) or "keyed" (a fresh Idempotency-Key:
    the job is made by job_create_v2 and its events staged for the flush)."""
    limit = "null" if rate_limit is None else str(rate_limit)
    key = "null" if path == "direct" else f"'{uuid.uuid4()}'"
    return (
        f"select cpa.job_submit_v3(%(t)s, 'req', 'explicit', %(todos)s::jsonb, {key}, 0, 3,"
        f" null, 'UTC', null, {limit}, 60)::text as job"
    )


async def _submit(db: store.Store, m: Member, path: str, todos: list[dict[str, Any]]) -> str:
    async with db.user(m.claims) as s:
        cur = await s.conn.execute(
            _call(path).encode(),  # type: ignore[arg-type]
            {"t": str(m.tenant_id), "todos": json.dumps(todos)},
        )
        row = await cur.fetchone()
    assert row is not None
    return str(json.loads(row["job"])["id"])


def _events(db_url: str, job_id: str) -> list[dict[str, Any]]:
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "select id, job_id::text, todo_id::text, kind, status, data, created_at"
            " from public.job_events where job_id = %s order by id",
            (job_id,),
        ).fetchall()
    return [
        {"id": r[0], "job_id": r[1], "todo_id": r[2], "kind": r[3], "status": r[4],
         "data": r[5], "created_at": r[6]}
        for r in rows
    ]  # fmt: skip


def _broadcasts(db_url: str, tenant: uuid.UUID, job_id: str) -> list[dict[str, Any]]:
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "select payload, event, private from realtime.messages where topic = %s"
            " order by inserted_at",
            (f"tenant:{tenant}",),
        ).fetchall()
    out = []
    for payload, event, private in rows:
        assert event == "job_events" and private is True
        if any(e["job_id"] == job_id for e in payload["events"]):
            out.append(payload)
    return out


def _residue(db_url: str) -> tuple[int, int]:
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "select (select count(*) from private.job_events_staged),"
            " (select count(*) from private.job_events_flush)"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def _shape(db_url: str, job_id: str) -> list[tuple[Any, ...]]:
    """The events with the job's own ToDo keys in place of ids: comparable across jobs."""
    with psycopg.connect(db_url) as conn:
        keys = dict(
            conn.execute(
                "select id::text, key from public.todos where job_id = %s", (job_id,)
            ).fetchall()
        )
    return [
        (keys.get(e["todo_id"]), e["kind"], e["status"], json.dumps(e["data"], sort_keys=True))
        for e in _events(db_url, job_id)
    ]


async def test_the_direct_path_writes_the_events_the_keyed_path_stages_and_broadcasts_them_once(
    db: store.Store, db_url: str, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    old = await _submit(db, m, "keyed", GRAPH)
    new = await _submit(db, m, "direct", GRAPH)
    assert _residue(db_url) == (0, 0)
    # Same events in the same order (the job's first, then the ToDos' in id order).
    assert len(_shape(db_url, new)) == 1 + len(GRAPH)
    with psycopg.connect(db_url) as conn:
        order = [
            str(r[0])
            for r in conn.execute(
                "select id from public.todos where job_id = %s order by id", (new,)
            ).fetchall()
        ]
    rows = _events(db_url, new)
    assert [r["todo_id"] for r in rows] == [None, *order]
    assert sorted(_shape(db_url, new), key=str) == sorted(_shape(db_url, old), key=str)
    assert _shape(db_url, new)[0][0] is None
    # One broadcast with exactly these events, as the flush sends them (the contract's shape).
    for job in (old, new):
        sent = _broadcasts(db_url, m.tenant_id, job)
        assert len(sent) == 1
        events = [events_contract.validate(e) for e in sent[0]["events"]]
        assert [e["id"] for e in events] == [r["id"] for r in _events(db_url, job)]
    assert {k for e in _broadcasts(db_url, m.tenant_id, new)[0]["events"] for k in e} == {
        k for e in _broadcasts(db_url, m.tenant_id, old)[0]["events"] for k in e
    }


async def test_the_one_trip_submit_leaves_its_events_observable(
    db: store.Store, db_url: str, member_factory: MemberFactory
) -> None:
    """Store.submit (the API's path) commits the events with the job: a reader finds them."""
    m = await member_factory()
    sub = store.Submission(
        tenant_id=None, todos=GRAPH, request=None, intent="explicit", idempotency_key=None,
        priority=0, run_at=None, time_zone="UTC", traceparent=None, rate_limit=(1000, 60),
    )  # fmt: skip
    job = json.loads(await db.submit(m.claims, sub))
    assert [e["kind"] for e in _events(db_url, job["id"])] == ["job.status"] + ["todo.status"] * 5
    assert len(_broadcasts(db_url, m.tenant_id, job["id"])) == 1
    assert _residue(db_url) == (0, 0)


async def test_a_refused_submit_leaves_no_event_and_no_broadcast(
    db: store.Store, db_url: str, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    await _submit(db, m, "direct", GRAPH)
    with psycopg.connect(db_url) as conn:
        before = conn.execute("select count(*) from public.job_events").fetchone()
        sent = conn.execute("select count(*) from realtime.messages").fetchone()
    # Past the rate limit (checked after the events are written) and a cycle (the edge check).
    with pytest.raises(errors.RateLimitedError), store.rate_limited():
        async with db.user(m.claims) as s:
            await s.conn.execute(
                _call("direct", rate_limit=0).encode(),  # type: ignore[arg-type]
                {"t": str(m.tenant_id), "todos": json.dumps(GRAPH)},
            )
    cycle = [{"key": "a", "action": "noop", "depends_on": ["b"]},
             {"key": "b", "action": "noop", "depends_on": ["a"]}]  # fmt: skip
    with pytest.raises(errors.InvalidError, match="cycle"), store.translate():
        await _submit(db, m, "direct", cycle)
    with psycopg.connect(db_url) as conn:
        assert conn.execute("select count(*) from public.job_events").fetchone() == before
        assert conn.execute("select count(*) from realtime.messages").fetchone() == sent
    assert _residue(db_url) == (0, 0)


async def test_later_changes_in_the_same_transaction_are_staged_after_the_direct_ones(
    db: store.Store, db_url: str, member_factory: MemberFactory
) -> None:
    """The setting that routes the job's events past the stage ends with the call: a status
    change of the new job later in the transaction is staged and flushed at commit, with a
    larger id and a broadcast of its own."""
    m = await member_factory()
    async with db.service() as s:
        await s.conn.execute(
            "select set_config('request.jwt.claims', %s, true)", (json.dumps(m.claims),)
        )
        cur = await s.conn.execute(
            _call("direct").encode(),  # type: ignore[arg-type]
            {"t": str(m.tenant_id), "todos": json.dumps(GRAPH)},
        )
        row = await cur.fetchone()
        assert row is not None
        job = str(json.loads(row["job"])["id"])
        cur = await s.conn.execute("select current_setting('cpa.events_direct', true) as v")
        assert (await cur.fetchone()) == {"v": ""}
        await s.conn.execute(
            "update public.todos set status = 'running' where job_id = %s and key = 'a'", (job,)
        )
    rows = _events(db_url, job)
    assert [(r["kind"], r["status"]) for r in rows][-1] == ("todo.status", "running")
    assert rows == sorted(rows, key=lambda r: r["id"]) and len(rows) == 1 + len(GRAPH) + 1
    assert len(_broadcasts(db_url, m.tenant_id, job)) == 2
    assert _residue(db_url) == (0, 0)


async def test_a_job_of_more_than_100_todos_is_staged_and_flushed(
    db: store.Store, db_url: str, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    todos = [{"key": f"k{i}", "action": "noop"} for i in range(101)]
    old = await _submit(db, m, "keyed", todos)
    new = await _submit(db, m, "direct", todos)
    assert len(_events(db_url, new)) == 102
    assert sorted(_shape(db_url, new), key=str) == sorted(_shape(db_url, old), key=str)
    sent = _broadcasts(db_url, m.tenant_id, new)
    assert sum(len(p["events"]) for p in sent) == 102
    assert _residue(db_url) == (0, 0)


async def test_other_writers_still_stage_while_the_setting_names_another_job(
    db: store.Store, db_url: str, member_factory: MemberFactory
) -> None:
    """Only the named job's inserted rows bypass the stage: an event of another job inserted
    with the setting on is staged and gets its id at commit (restage)."""
    m = await member_factory()
    other = await _submit(db, m, "direct", GRAPH)
    async with db.service() as s:
        await s.conn.execute(
            "select set_config('cpa.events_direct', %s, true)", (str(uuid.uuid4()),)
        )
        await s.conn.execute(
            "insert into public.job_events (tenant_id, job_id, kind, data)"
            " values (%s, %s, 'note', '{}')",
            (str(m.tenant_id), other),
        )
    rows = _events(db_url, other)
    assert [r["kind"] for r in rows][-1] == "note" and len(rows) == 1 + len(GRAPH) + 1
    sent = _broadcasts(db_url, m.tenant_id, other)  # the flush sent the restaged note
    assert len(sent) == 2 and [e["kind"] for e in sent[1]["events"]] == ["note"]
    assert _residue(db_url) == (0, 0)


SIGNATURE = (
    "private.job_submit_as_v1(text, uuid, text, text, jsonb, text, integer, integer, timestamptz,"
    " text, text, integer, integer)"
)


@pytest.mark.parametrize("role", ["anon", "authenticated", "service_role"])
async def test_only_the_owner_may_submit_with_claims_of_its_choice(
    db: store.Store, member_factory: MemberFactory, role: str
) -> None:
    """private.job_submit_as_v1 takes the claims as an argument: a caller that could reach it
    could act as anyone. Only its owner (the API's login role) may execute it."""
    m = await member_factory()
    async with db.admin() as s:
        cur = await s.conn.execute(
            "select has_function_privilege(%s, %s, 'execute') as may",
            (role, SIGNATURE),
        )
        assert (await cur.fetchone()) == {"may": False}
    with pytest.raises(errors.NotFoundError, match="permission denied for (function|schema)"):
        async with db.admin() as s:
            await s.conn.execute(f"select set_config('role', '{role}', true)")  # type: ignore[arg-type]
            await s.conn.execute(
                "select private.job_submit_as_v1(%s, null, 'x', 'explicit', %s::jsonb)",
                (json.dumps(m.claims), json.dumps(GRAPH)),
            )


async def test_one_statement_submit_runs_as_the_caller(
    db: store.Store, db_url: str, member_factory: MemberFactory
) -> None:
    """Store.submit's one statement: the job is the caller's (created_by, their tenant), a
    tenant they are not a member of is refused, and the transaction's role was authenticated."""
    a, b = await member_factory("a"), await member_factory("b")
    sub = store.Submission(
        tenant_id=None, todos=GRAPH, request=None, intent="explicit", idempotency_key=None,
        priority=0, run_at=None, time_zone="UTC", traceparent=None, rate_limit=(1000, 60),
    )  # fmt: skip
    job = json.loads(await db.submit(a.claims, sub))
    assert job["tenant_id"] == str(a.tenant_id)
    with psycopg.connect(db_url) as conn:
        row = conn.execute("select created_by from public.jobs where id = %s", (job["id"],))
        assert row.fetchone() == (a.user_id,)
    with pytest.raises(errors.NotFoundError):
        await db.submit(a.claims, dataclasses.replace(sub, tenant_id=b.tenant_id))
    assert db._submit_as  # the owner's one statement, not the fallback


async def test_a_login_role_that_may_not_call_it_falls_back_to_two_statements(
    db: store.Store, db_url: str, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    async with db.admin() as s:
        cur = await s.conn.execute(
            "select rolsuper as super from pg_roles where rolname = current_user"
        )
        if ((await cur.fetchone()) or {}).get("super"):
            # A superuser passes every privilege check, so no revoke can refuse it; the
            # embedded server's (and hosted Supabase's) postgres is not one.
            pytest.skip("the login role is a superuser (TEST_DATABASE_URL): nothing to revoke")
        await s.conn.execute(f"revoke execute on function {SIGNATURE} from current_user")  # type: ignore[arg-type]
    sub = store.Submission(
        tenant_id=None, todos=GRAPH, request=None, intent="explicit", idempotency_key=None,
        priority=0, run_at=None, time_zone="UTC", traceparent=None, rate_limit=(1000, 60),
    )  # fmt: skip
    first = json.loads(await db.submit(m.claims, sub))
    assert not db._submit_as
    second = json.loads(await db.submit(m.claims, sub))
    for job in (first, second):
        assert job["tenant_id"] == str(m.tenant_id)
        assert len(_events(db_url, job["id"])) == 1 + len(GRAPH)
