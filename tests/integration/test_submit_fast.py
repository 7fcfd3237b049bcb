"""POST /v1/jobs made cheaper (migration 20261128000100_submit_fast, Store.submit): the same
invariants refused with the same messages, the same answers, and the one-round-trip call leaves
its connection as it found it.

The invariant triggers run private.todos_check_insert_v2 and private.todo_edges_check_insert_v2
(the v1 trigger functions they replaced, whose messages they kept, were dropped by the contract
migration 20261207009000): each bad graph is refused with its message.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cpa_scheduler import errors, store

from tests.conftest import Member, MemberFactory
from tests.integration.test_exposure import BAD_GRAPHS, _deep

SUBMIT = (
    "select cpa.job_submit_v3(%(t)s, 'x', 'explicit', %(todos)s::jsonb, null, 0, 3, null, 'UTC',"
    " null, null, 60)::text as job"
)

# Beyond test_exposure's cases: each of the catalogue's bounds, and bad edges.
MORE_BAD: dict[str, tuple[list[dict[str, Any]], str]] = {
    "missing required param": ([{"key": "w", "action": "wait", "params": {}}], "params.seconds"),
    "too long a string": (
        [{"key": "n", "action": "notify", "params": {"message": "m" * 4001}}],
        "more than 4000",
    ),
    "not in the enum": (
        [{"key": "n", "action": "notify", "params": {"message": "m", "level": "loud"}}],
        "not one of",
    ),
    "below the minimum": (
        [{"key": "n", "action": "noop", "params": {"duration_ms": -1}}],
        "outside",
    ),
    "params not an object": ([{"key": "n", "action": "noop", "params": [1, 2]}], "JSON object"),
    "bad key": ([{"key": "a b", "action": "noop"}], "1-64 characters"),
    "self dependency": ([{"key": "a", "action": "noop", "depends_on": ["a"]}], "todo_edges"),
    "cycle listed in order": (
        [
            {"key": "a", "action": "noop", "depends_on": ["c"]},
            {"key": "b", "action": "noop", "depends_on": ["a"]},
            {"key": "c", "action": "noop", "depends_on": ["b"]},
        ],
        "cycle",
    ),
    "unknown dependency": ([{"key": "a", "action": "noop", "depends_on": ["zz"]}], "not in"),
    "no todos": ([], "non-empty"),
}
ALL_BAD = {**BAD_GRAPHS, **MORE_BAD}

# Must pass: values at the bounds, a reference standing in an enum, params longer than 129
# bytes but shallow, and nesting of exactly 64 levels.
GOOD = [
    {"key": "w", "action": "wait", "params": {"seconds": 2592000}},
    {"key": "n", "action": "notify", "params": {"message": "m" * 4000, "level": "info"},
     "depends_on": ["w"]},
    {"key": "r", "action": "notify", "params": {"message": "x", "level": {"$ref": "w.result"}},
     "depends_on": ["w"]},
    {"key": "long", "action": "noop", "params": {f"k{i}": i for i in range(40)}},
    {"key": "deep", "action": "noop", "params": _deep(63)},
]  # fmt: skip


async def _as_user(db: store.Store, member: Member, query: str, params: dict[str, Any]) -> Any:
    async with db.user(member.claims) as s:
        cur = await s.conn.execute(query.encode(), params)  # type: ignore[arg-type]
        return await cur.fetchone()


@pytest.mark.parametrize("case", sorted(ALL_BAD))
async def test_submit_refuses_each_bad_graph_with_its_message(
    db: store.Store, member_factory: MemberFactory, case: str
) -> None:
    m = await member_factory()
    todos, expected = ALL_BAD[case]
    with pytest.raises(errors.InvalidError) as info:
        with store.translate():
            await _as_user(db, m, SUBMIT, {"t": str(m.tenant_id), "todos": json.dumps(todos)})
    assert expected in info.value.message
    async with db.service() as s:
        cur = await s.conn.execute("select count(*) as n from public.jobs")
        row = await cur.fetchone()
    assert row is not None and row["n"] == 0  # nothing of the refused job is left


async def test_submit_accepts_values_at_the_bounds(
    db: store.Store, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    row = await _as_user(db, m, SUBMIT, {"t": str(m.tenant_id), "todos": json.dumps(GOOD)})
    job = json.loads(row["job"])
    assert [t["key"] for t in job["todos"]] == [t["key"] for t in GOOD]


async def test_submit_answers_the_same_with_and_without_a_key(
    db: store.Store, member_factory: MemberFactory
) -> None:
    """Same answer from the direct path (no key: one insert per table) as from the keyed path
    (cpa.job_create_v2, then updates), and as the job read back, for a graph using every column
    the keyed path sets by updates: the job's run_at and zone, a ToDo's own later run_at, agent
    timeouts, optional ToDos, dependencies listed out of order, the trace context."""
    m = await member_factory()
    soon = datetime.now(UTC) + timedelta(hours=1)
    todos = [
        {"key": "z", "action": "noop", "target": "cloud", "params": {"duration_ms": 1}},
        {"key": "a", "action": "noop", "target": "cloud", "params": {}},
        {"key": "m", "action": "desktop.open_app", "target": "desktop", "params": {"app": "X"},
         "depends_on": ["z", "a"], "agent_timeout": 30, "optional": True,
         "run_at": (soon + timedelta(hours=2)).isoformat()},
        {"key": "c", "action": "email.send", "target": "desktop", "requires_confirmation": True,
         "params": {"to": "a@b.c", "subject": "s", "body": "b"}, "depends_on": ["m"]},
    ]  # fmt: skip
    answers = []
    for key in (str(uuid.uuid4()), None):
        query = (
            "select cpa.job_submit_v3(%(t)s, 'req', 'explicit', %(todos)s::jsonb, %(key)s,"
            " 2, 3, %(run_at)s, 'Europe/Berlin', %(tp)s, 100, 60)::text as job"
        )
        tp = f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"
        params = {
            "t": str(m.tenant_id),
            "todos": json.dumps(todos),
            "run_at": soon,
            "tp": tp,
            "key": key,
        }
        answer = json.loads((await _as_user(db, m, query, params))["job"])
        async with db.service() as s:
            job = await s.job_get(answer["id"])
            rows = await s.job_todos(answer["id"])
            cur = await s.conn.execute(
                "select key, run_after, agent_timeout_seconds, optional, deps_remaining, priority"
                " from public.todos where job_id = %s order by position",
                (answer["id"],),
            )
            stored = await cur.fetchall()
        assert job.traceparent == tp and job.time_zone == "Europe/Berlin" and job.run_at == soon
        assert job.priority == 2 and job.todo_count == 4
        assert answer["todos"][2]["depends_on"] == ["a", "z"]
        assert [r["key"] for r in rows] == ["z", "a", "m", "c"]
        assert answer.pop("created_by") == str(m.user_id)
        for key in ("id", "tenant_id", "created_at"):
            answer.pop(key)
        for t in answer["todos"]:
            t.pop("id")
        answers.append((answer, [{k: v for k, v in r.items() if k != "run_after"} for r in stored],
                        [r["run_after"] >= soon for r in stored]))  # fmt: skip
    assert answers[0] == answers[1]


async def test_one_trip_submit_commits_and_leaves_the_connection_transactional(
    db: store.Store, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    good = store.Submission(
        tenant_id=None, todos=[{"key": "a", "action": "noop", "target": "cloud"}], request=None,
        intent="explicit", idempotency_key=None, priority=0, run_at=None, time_zone="UTC",
        traceparent=None, rate_limit=(1, 60),
    )  # fmt: skip
    job = json.loads(await db.submit(m.claims, good))
    assert job["tenant_id"] == str(m.tenant_id)
    bad = dataclasses.replace(good, todos=[{"key": "a", "action": "nope"}])
    with pytest.raises(errors.InvalidError, match="unknown action"):
        await db.submit(m.claims, bad)
    with pytest.raises(errors.RateLimitedError):  # the limit of 1 was used by the first job
        await db.submit(m.claims, good)
    other = await member_factory("other")
    with pytest.raises(errors.NotFoundError):  # a tenant the caller is not a member of
        await db.submit(m.claims, dataclasses.replace(good, tenant_id=other.tenant_id))
    # Committed: another connection sees the job; the refused ones left nothing.
    async with db.admin() as s:
        cur = await s.conn.execute("select id from public.jobs")
        assert [str(r["id"]) for r in await cur.fetchall()] == [job["id"]]
        cur = await s.conn.execute("select hits from private.rate_limits")
        assert [r["hits"] for r in await cur.fetchall()] == [1]
    # Every pooled connection is back out of autocommit, with no claims or role left over.
    conns = [await db._pool.getconn() for _ in range(db._pool.get_stats()["pool_size"])]
    try:
        for conn in conns:
            assert not conn.autocommit
            cur = await conn.execute(
                "select current_user as who, current_setting('request.jwt.claims', true) as c"
            )
            row = await cur.fetchone()
            assert row is not None and row["who"] != "authenticated" and not row["c"]
            await conn.rollback()
    finally:
        for conn in conns:
            await db._pool.putconn(conn)
