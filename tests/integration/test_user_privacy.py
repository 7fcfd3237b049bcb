"""Each user's own (issue 21): two members of one tenant and its owner, in the database.

A job belongs to its creator: members read their own jobs, ToDos and events, the tenant's
owners and admins read all (RLS). Desktop ToDos go only to the owner's agents; an agent id is
bound to its first user. Realtime joins follow the same rule: the policy on
``realtime.messages`` is checked here as Realtime checks a join, as ``authenticated`` with the
subscriber's claims and ``realtime.topic`` set.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import psycopg
import pytest
from cpa_scheduler import agent, errors, store

from tests.conftest import Member, MemberFactory

OPEN = {"key": "open", "action": "desktop.open_app", "target": "desktop", "params": {"app": "x"}}


async def _member(db: store.Store, tenant: Member, role: str = "member") -> Member:
    m = Member(tenant.tenant_id, uuid.uuid4())
    async with db.admin() as s:
        await s.membership_ensure(m.tenant_id, m.user_id, tenant_name="T", role=role,
                                  email=f"{m.user_id}@x.test")  # fmt: skip
    return m


@pytest.fixture
async def team(db: store.Store, member_factory: MemberFactory) -> tuple[Member, Member, Member]:
    """(owner, alice, bob): one tenant; alice and bob are plain members."""
    owner = await member_factory("T")
    return owner, await _member(db, owner), await _member(db, owner)


async def _job_as(db: store.Store, m: Member, todos: list[dict[str, Any]]) -> store.JobRow:
    async with db.user(m.claims) as s:
        return await s.job_create(tenant_id=m.tenant_id, todos=todos, request="mine")


async def test_members_read_their_own_jobs_todos_and_events_and_admins_all(
    db: store.Store, team: tuple[Member, Member, Member]
) -> None:
    owner, alice, bob = team
    job = await _job_as(db, alice, [OPEN])
    assert job.created_by == alice.user_id
    for who, sees in ((alice, True), (bob, False), (owner, True)):
        async with db.user(who.claims) as s:
            listed = [j.id for j in await s.job_list(tenant_id=who.tenant_id)]
            assert (job.id in listed) is sees
            assert bool(await s.job_todos(job.id)) is sees
            assert bool(await s.event_list(job.id)) is sees
            if not sees:
                with pytest.raises(errors.NotFoundError):
                    await s.job_get(job.id)
    # Bob may not write notes on Alice's ToDo either.
    async with db.user(alice.claims) as s:
        todo_id = (await s.job_todos(job.id))[0]["id"]
    async with db.user(bob.claims) as s:
        with pytest.raises(errors.NotFoundError):
            await s.todo_note(todo_id, "agent.inform", {"text": "hi"})


async def test_alices_desktop_todo_goes_only_to_alices_agent(
    db: store.Store, team: tuple[Member, Member, Member]
) -> None:
    owner, alice, bob = team
    job = await _job_as(db, alice, [OPEN])
    async with db.user(bob.claims) as s:  # Bob's own agent: nothing for him
        assert await agent.claim(s, tenant_id=bob.tenant_id, agent_id="bob-pc", actions=None) == []
    async with db.user(owner.claims) as s:  # an admin's agent neither: it is Alice's job
        assert (
            await agent.claim(s, tenant_id=owner.tenant_id, agent_id="own-pc", actions=None) == []
        )
    async with db.user(alice.claims) as s:  # Alice's agent registers without taking it
        await s.agent_upsert(alice.tenant_id, "alice-pc", "Alice's PC", ["file.write"])
    with pytest.raises(errors.ForbiddenError, match="belongs to another user"):
        async with db.user(bob.claims) as s:  # Bob under Alice's agent id
            await agent.claim(s, tenant_id=bob.tenant_id, agent_id="alice-pc", actions=None)
    with pytest.raises(errors.ForbiddenError):
        async with db.user(bob.claims) as s:
            await s.agent_complete("alice-pc", [{"id": str(job.id), "result": {}}])
    async with db.admin() as s:
        agents = await _fetch(s, (
            "select agent_key, created_by, actions from public.agents order by agent_key"
        ), all)  # fmt: skip
        todo = await _fetch(s, (
            "select status, lease_owner from public.todos where job_id = %s", (job.id,)
        ), one)  # fmt: skip
    assert {a["agent_key"]: a["created_by"] for a in agents}["alice-pc"] == alice.user_id
    assert [a["actions"] for a in agents if a["agent_key"] == "alice-pc"] == [["file.write"]]
    assert todo == {"status": "ready", "lease_owner": None}

    async with db.user(alice.claims) as s:
        got = await agent.claim(s, tenant_id=alice.tenant_id, agent_id="alice-pc", actions=None)
    assert [a.payload.todo_id for a in got] == [str((await _todo_ids(db, job.id))[0])]
    async with db.user(alice.claims) as s:
        assert await s.agent_complete("alice-pc", [{"id": got[0].payload.todo_id, "result": {}}])

    # The audit log names the agent and whose desktop ran it; Bob does not read Alice's entries.
    async with db.user(owner.claims) as s:
        rows = await _fetch(s, (
            "select actor_id, after from public.audit_log where entity = 'todos' order by id"
        ), all)  # fmt: skip
    assert [(r["after"]["status"], r["after"]["agent"]) for r in rows] == [
        ("running", "alice-pc"),
        ("done", "alice-pc"),
    ]
    assert {r["after"]["agent_user"] for r in rows} == {str(alice.user_id)}
    assert {r["actor_id"] for r in rows} == {alice.user_id}
    async with db.user(bob.claims) as s:
        assert await _fetch(s, ("select count(*) as n from public.audit_log "
                                     "where entity = 'todos'"), one) == {"n": 0}  # fmt: skip


async def _todo_ids(db: store.Store, job_id: uuid.UUID) -> list[uuid.UUID]:
    async with db.admin() as s:
        rows = await _fetch(s, (
            "select id from public.todos where job_id = %s order by position", (job_id,)
        ), all)  # fmt: skip
    return [r["id"] for r in rows]


async def test_an_idle_claim_writes_nothing(
    db: store.Store, team: tuple[Member, Member, Member]
) -> None:
    _, alice, _ = team
    async with db.user(alice.claims) as s:
        await agent.claim(s, tenant_id=alice.tenant_id, agent_id="alice-pc", actions=["x.y"])
    async with db.user(alice.claims) as s:  # seen a moment ago, same actions: no write at all
        await agent.claim(s, tenant_id=alice.tenant_id, agent_id="alice-pc", actions=["x.y"])
        row = await _fetch(s, ("select pg_current_xact_id_if_assigned() as x"), one)
        assert row == {"x": None}
    async with db.user(alice.claims) as s:  # new actions: that is a change, written
        await agent.claim(s, tenant_id=alice.tenant_id, agent_id="alice-pc", actions=["a.b"])
        row = await _fetch(s, ("select pg_current_xact_id_if_assigned() as x"), one)
        assert row is not None and row["x"] is not None


async def _fetch(s: store.Session, query: str | tuple[Any, ...], how: Any) -> Any:
    cur = await s.conn.execute(*((query,) if isinstance(query, str) else query))
    return await (cur.fetchall() if how is all else cur.fetchone())


one = object()


def _visible(db_url: str, claims: dict[str, Any], topic: str) -> set[Any]:
    """The broadcast rows a subscriber may read on ``topic``, as Realtime checks a join."""
    with psycopg.connect(db_url) as conn:
        conn.execute("set local role authenticated")
        conn.execute("select set_config('request.jwt.claims', %s, true)", (json.dumps(claims),))
        conn.execute("select set_config('realtime.topic', %s, true)", (topic,))
        return {r[0] for r in conn.execute("select id from realtime.messages").fetchall()}


def _by_topic(db_url: str) -> dict[str, set[Any]]:
    with psycopg.connect(db_url) as conn:
        out: dict[str, set[Any]] = {}
        for topic, ident in conn.execute("select topic, id from realtime.messages"):
            out.setdefault(topic, set()).add(ident)
        return out


async def test_realtime_topics_follow_the_same_rule(
    db_url: str, db: store.Store, team: tuple[Member, Member, Member]
) -> None:
    owner, alice, bob = team
    await _job_as(db, alice, [OPEN])
    t = alice.tenant_id
    mine, tenant, wake = (
        f"tenant:{t}:user:{alice.user_id}",
        f"tenant:{t}",
        f"tenant:{t}:agents:{alice.user_id}",
    )
    topics = _by_topic(db_url)
    assert {mine, tenant, wake} <= set(topics)
    assert _visible(db_url, alice.claims, mine) == topics[mine]
    assert _visible(db_url, alice.claims, wake) == topics[wake]
    assert _visible(db_url, alice.claims, tenant) == set()
    assert _visible(db_url, owner.claims, mine) == topics[mine]
    assert _visible(db_url, owner.claims, tenant) == topics[tenant]
    assert _visible(db_url, owner.claims, wake) == set()  # wake-ups: that user's desktops only
    for topic in (mine, tenant, wake):
        assert _visible(db_url, bob.claims, topic) == set()
    # The wake-up names the ToDo, never its params.
    with psycopg.connect(db_url) as conn:
        payload = conn.execute(
            "select payload from realtime.messages where topic = %s", (wake,)
        ).fetchone()
    assert payload is not None and set(payload[0]) == {"todo_id", "job_id", "action"}


async def test_bobs_desktop_todo_is_announced_while_only_alices_agent_is_online(
    db: store.Store, team: tuple[Member, Member, Member]
) -> None:
    """The sweep's "no agent offers it" counts only agents that may claim the ToDo: the job
    owner's. Alice's online agent does not take Bob's ToDo, so Bob's is announced."""
    _, alice, bob = team
    async with db.user(alice.claims) as s:
        await s.agent_upsert(alice.tenant_id, "alice-pc", "Alice's PC", ["desktop.open_app"])
    alices = await _job_as(db, alice, [OPEN])
    bobs = await _job_as(db, bob, [OPEN])
    async with db.service() as s:
        assert await s.desktop_sweep() == 1
    async with db.service() as s:  # the events get their ids at commit
        noticed = {
            job.id: [e for e in await s.event_list(job.id) if e["kind"] == "todo.waiting_for_agent"]
            for job in (alices, bobs)
        }
    assert noticed[alices.id] == []
    assert [e["data"]["action"] for e in noticed[bobs.id]] == ["desktop.open_app"]


async def test_a_desktop_todo_that_comes_due_wakes_its_owners_agents_once(
    db: store.Store, db_url: str, team: tuple[Member, Member, Member]
) -> None:
    """No status changes when a parked desktop ToDo's run_after passes; the sweep wakes the
    owner's agents then (NOTIFY for long-polling claims, Realtime todo_ready), once."""
    _, alice, _ = team
    later = {**OPEN, "run_at": "2999-01-01T00:00:00Z"}
    job = await _job_as(db, alice, [later])
    [todo_id] = await _todo_ids(db, job.id)
    async with db.admin() as s:
        # Its time has come: run_after in the past, still parked (the row trigger, which would
        # un-park it on this write, is off inside this transaction only).
        await s.conn.execute("alter table public.todos disable trigger todos_start")
        await s.conn.execute(
            "update public.todos set run_after = now() - interval '1 second' where id = %s",
            (todo_id,),
        )
        await s.conn.execute("alter table public.todos enable trigger todos_start")
    topic = f"tenant:{alice.tenant_id}:agents:{alice.user_id}"
    wakes = "select count(*) from realtime.messages where topic = %s and event = 'todo_ready'"
    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute("listen cpa_desktop_ready")
        (before,) = listener.execute(wakes, (topic,)).fetchone() or (0,)
        for _ in range(2):
            async with db.service() as s:
                await s.desktop_sweep()
        notes = [n.payload for n in listener.notifies(timeout=0.5, stop_after=3)]
        (after,) = listener.execute(wakes, (topic,)).fetchone() or (0,)
        parked = listener.execute(
            "select parked from public.todos where id = %s", (todo_id,)
        ).fetchone()
    assert notes == [f"{alice.tenant_id}:{alice.user_id}"]
    assert after - before == 1
    assert parked == (False,)
