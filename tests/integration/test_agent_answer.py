"""agent.answer without a web framework: a host passes a parsed message and the sender's context."""

from __future__ import annotations

import pytest
from cpa_scheduler import agent, dispatch, errors, protocol, store

from tests.conftest import JobFactory, Member, MemberFactory


class Counter:
    """A limiter that refuses past ``limit`` requests."""

    def __init__(self, limit: int) -> None:
        self.limit, self.seen = limit, 0

    async def hit(self, tenant_id: str, session: store.Session | None = None) -> None:
        self.seen += 1
        if self.seen > self.limit:
            raise errors.RateLimitedError("Too many jobs; wait a minute.", retry_after=60)


def request(text: str) -> protocol.Message:
    return protocol.make("request", {"text": text}, sender="desk", receiver=agent.SCHEDULER)


async def answer(
    db: store.Store, m: Member, msg: protocol.Message, limiter: Counter | None = None
) -> agent.Reply:
    async with db.user(m.claims) as session:
        ctx = agent.Context(session, m.tenant_id, False, limiter or Counter(100))
        return await agent.answer(msg, ctx)


async def test_a_request_becomes_a_job_and_the_limit_refuses(
    db: store.Store, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    limiter = Counter(1)
    agreed = await answer(db, m, request("Stell einen Timer auf 5 Minuten"), limiter)
    assert isinstance(agreed, protocol.Agree) and agreed.payload.text == "intent timer"
    assert agreed.conversation_id == agreed.payload.job_id
    async with db.user(m.claims) as s:
        assert (await s.job_get(agreed.payload.job_id)).intent == "timer"
    refused = await answer(db, m, request("Stell einen Timer auf 5 Minuten"), limiter)
    assert isinstance(refused, protocol.Refuse) and refused.payload.code == "rate_limited"


async def test_typed_replies(db: store.Store, member_factory: MemberFactory) -> None:
    m = await member_factory()
    discover = protocol.make("discover", {"target": "cloud"}, sender="desk", receiver="scheduler")
    offer = await answer(db, m, discover)
    assert isinstance(offer, protocol.Offer) and "noop" in offer.payload.actions
    assert offer.in_reply_to == discover.id and offer.receiver == "desk"
    assign = protocol.make(
        "assign",
        {"todo_id": "t", "job_id": "j", "key": "k", "action": "noop"},
        sender="desk",
        receiver="scheduler",
    )
    refused = await answer(db, m, assign)
    assert isinstance(refused, protocol.Refuse) and refused.payload.code == "not_allowed"


async def test_a_confirm_naming_nothing_is_a_protocol_error(
    db: store.Store, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    # The payload names a ToDo, but an empty one: neither a ToDo nor a job to confirm.
    confirm = protocol.make("confirm", {"todo_id": ""}, sender="desk", receiver="scheduler")
    with pytest.raises(errors.ProtocolError, match="must name the ToDo"):
        await answer(db, m, confirm)


async def test_a_reference_that_cannot_be_resolved_fails_the_claimed_todo(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    open_app = {"key": "o", "action": "desktop.open_app", "target": "desktop", "depends_on": ["n"],
                "params": {"app": {"$ref": "n.result.app"}}}  # fmt: skip
    job = await job_factory(
        m, [{"key": "n", "action": "noop", "target": "cloud", "params": {"x": 1}}, open_app]
    )
    await dispatch.Dispatcher(db).run_pass(5)
    async with db.user(m.claims) as s:
        assert await agent.claim(s, tenant_id=m.tenant_id, agent_id="laptop", actions=None) == []
        todos = {t["key"]: t for t in await s.job_todos(job.id)}
    assert todos["o"]["status"] == "failed" and "app" in todos["o"]["error"]
