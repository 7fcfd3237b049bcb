"""The agent lease owner is the database's: ``private.agent_owner_v1`` (migration
20261127100100_agent_owner). The agent's operations take its key, never an owner; these tests pin
that the claim writes the helper's owner, that the reports act only on the sender's own leases,
and that the helper agrees with what the earlier functions expect of an agent owner (the pinned
agent in todo_claim, ``agent:%`` for end users in complete, fail and release)."""

from __future__ import annotations

from typing import Any

from cpa_scheduler import store

from tests.conftest import JobFactory, Member, MemberFactory

OPEN_APP = {"key": "o", "action": "desktop.open_app", "target": "desktop", "params": {"app": "X"}}


async def agent_owner(db: store.Store, agent_key: str) -> str:
    async with db.admin() as s:
        cur = await s.conn.execute("select private.agent_owner_v1(%s) as owner", (agent_key,))
        row = await cur.fetchone()
    assert row is not None
    return str(row["owner"])


async def claim_one(db: store.Store, m: Member, agent_key: str) -> dict[str, Any]:
    async with db.user(m.claims) as s:
        [row] = await s.agent_claim(m.tenant_id, agent_key, ["desktop.open_app"], 1)
    return row


async def todo(db: store.Store, m: Member, todo_id: Any) -> dict[str, Any]:
    async with db.user(m.claims) as s:
        return await s.todo_get(todo_id)


async def test_the_claim_leases_to_the_helpers_owner(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    await job_factory(m, [OPEN_APP, OPEN_APP | {"key": "p"}])
    row = await claim_one(db, m, "laptop:1")
    assert row["lease_owner"] == await agent_owner(db, "laptop:1")


async def test_reports_refuse_another_agents_lease(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    await job_factory(m, [OPEN_APP])
    row = await claim_one(db, m, "laptop")
    mine = await agent_owner(db, "laptop")
    todo_id = str(row["id"])
    # Another agent, even naming the holder's owner in its items: the database sets the owner.
    for item in ({"id": todo_id}, {"id": todo_id, "owner": mine}):
        async with db.user(m.claims) as s:
            assert await s.agent_complete("desktop-2", [item | {"result": {"x": 1}}]) == 0
            assert await s.agent_fail("desktop-2", [item | {"error": "boom"}]) == 0
            assert await s.agent_release("desktop-2", [item], refusal=True) == 0
    held = await todo(db, m, todo_id)
    assert held["status"] == "running" and held["lease_owner"] == mine
    assert held["refusals"] == 0 and held["result"] is None
    async with db.user(m.claims) as s:
        assert await s.agent_complete("laptop", [{"id": todo_id, "result": {"x": 1}}]) == 1
    assert (await todo(db, m, todo_id))["status"] == "done"


async def test_the_holder_fails_and_releases_its_own_lease(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    await job_factory(m, [OPEN_APP, OPEN_APP | {"key": "p"}])
    first = await claim_one(db, m, "laptop")
    async with db.user(m.claims) as s:
        assert await s.agent_release("laptop", [{"id": str(first["id"])}], refusal=True) == 1
    released = await todo(db, m, first["id"])
    assert released["status"] == "ready" and released["refusals"] == 1
    async with db.user(m.claims) as s:
        rows = await s.agent_claim(m.tenant_id, "laptop", ["desktop.open_app"], 5)
        items = [{"id": str(r["id"]), "error": "boom", "retryable": True} for r in rows]
        assert await s.agent_fail("laptop", items, backoff_base=0.01) == 2
    for r in rows:
        failed = await todo(db, m, r["id"])
        assert failed["status"] == "ready" and failed["error"] == "boom"


async def test_a_user_cannot_reach_the_dispatchers_todo_through_an_agent_key(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    await job_factory(m, [{"key": "a", "action": "noop"}])
    async with db.service() as s:
        [row] = await s.todo_claim(target="cloud", owner="dispatcher:abc", limit=1)
    todo_id = str(row.id)
    async with db.user(m.claims) as s:
        for key in ("dispatcher:abc", "abc", ""):
            assert await s.agent_complete(key, [{"id": todo_id, "result": 1}]) == 0
            assert await s.agent_fail(key, [{"id": todo_id, "error": "x"}]) == 0
            assert await s.agent_release(key, [{"id": todo_id}]) == 0
    held = await todo(db, m, todo_id)
    assert held["status"] == "running" and held["lease_owner"] == "dispatcher:abc"


async def test_a_routed_todo_goes_to_the_named_agent_only(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    # The claim matches the pinned agent as 'agent:' || assigned_agent: the helper's owner
    # must be exactly that.
    m = await member_factory()
    job = await job_factory(m, [OPEN_APP])
    async with db.user(m.claims) as s:
        assert await s.job_route(job.id, "laptop:1") == 1
        assert await s.agent_claim(m.tenant_id, "other", None, 5) == []
        [row] = await s.agent_claim(m.tenant_id, "laptop:1", None, 5)
    assert row["lease_owner"] == await agent_owner(db, "laptop:1")


async def test_the_agent_operations_are_for_members_and_the_service(db: store.Store) -> None:
    async with db.admin() as s:
        cur = await s.conn.execute(
            """
            select n.nspname || '.' || p.proname as fn,
                   has_function_privilege('anon', p.oid, 'execute') as anon,
                   has_function_privilege('authenticated', p.oid, 'execute') as authenticated,
                   has_function_privilege('service_role', p.oid, 'execute') as service,
                   p.prosecdef as definer, p.provolatile as volatility
              from pg_proc p join pg_namespace n on n.oid = p.pronamespace
             where (n.nspname = 'cpa' and p.proname in ('agent_claim_v2', 'agent_complete_v1',
                                                        'agent_fail_v1', 'agent_release_v1'))
                or (n.nspname = 'private' and p.proname in ('agent_owner_v1', 'agent_items_v1'))
            """
        )
        rows = {r["fn"]: r for r in await cur.fetchall()}
    assert len(rows) == 6
    for fn, r in rows.items():
        if fn.startswith("cpa."):
            assert (r["anon"], r["authenticated"], r["service"], r["definer"]) == (
                False, True, True, True
            ), fn  # fmt: skip
        else:  # only the definer functions above call the helpers
            assert not (r["anon"] or r["authenticated"] or r["service"]), fn
            # The owner is a pure function of the key; the items also check the agent's user.
            assert r["volatility"] == ("i" if fn == "private.agent_owner_v1" else "s"), fn
