"""POST /v1/messages answer for answer: every message type, field by field, with its status.

The answers are pinned exactly (apart from each reply's own id and time), so moving the
protocol's meaning between modules cannot change what an agent receives.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from cpa_scheduler import catalogue, intents

from tests.conftest import Member, MemberFactory
from tests.functions.conftest import bearer

Send = Callable[..., Awaitable[dict[str, Any]]]
NOTED = {"job_id": None, "todo_id": None, "text": "noted"}


def message(kind: str, payload: dict[str, Any], **envelope: Any) -> dict[str, Any]:
    return {
        "id": uuid.uuid4().hex,
        "type": kind,
        "sender": "desk",
        "receiver": "scheduler",
        "trace_id": uuid.uuid4().hex,
        "payload": payload,
        **envelope,
    }


@pytest.fixture
async def member(member_factory: MemberFactory) -> Member:
    return await member_factory()


@pytest.fixture
def send(client: httpx.AsyncClient, member: Member) -> Send:
    async def post(kind: str, payload: dict[str, Any], **envelope: Any) -> dict[str, Any]:
        sent = message(kind, payload, **envelope)
        r = await client.post("/v1/messages", headers=bearer(member), json=sent)
        assert r.status_code == 200, r.text
        reply: dict[str, Any] = r.json()
        # The envelope of every reply: roles swapped, same trace, in reply to the message.
        assert reply.pop("id") and reply.pop("created_at")
        assert reply.pop("sender") == sent["receiver"] and reply.pop("receiver") == sent["sender"]
        assert reply.pop("in_reply_to") == sent["id"] and reply.pop("trace_id") == sent["trace_id"]
        assert reply.pop("protocol") == "cpa-acp/1" and reply.pop("reply_by") is None
        return reply

    return post


def agree(
    text: str | None,
    *,
    job_id: str | None = None,
    todo_id: str | None = None,
    conversation_id: str | None = None,
) -> dict[str, Any]:
    payload = {"job_id": job_id, "todo_id": todo_id, "text": text}
    return {"type": "agree", "conversation_id": conversation_id, "payload": payload}


def refuse(code: str, reason: str, *, todo_id: str | None = None) -> dict[str, Any]:
    payload = {"reason": reason, "code": code, "job_id": None, "todo_id": todo_id}
    return {"type": "refuse", "conversation_id": None, "payload": payload}


def inform(text: str, *, job_id: str | None = None, todo_id: str | None = None) -> dict[str, Any]:
    payload = {"text": text, "job_id": job_id, "todo_id": todo_id, "status": None, "data": {}}
    return {"type": "inform", "conversation_id": None, "payload": payload}


async def test_requests_proposals_and_routes(
    send: Send, client: httpx.AsyncClient, member: Member
) -> None:
    timer = await send("request", {"text": "Stell einen Timer auf 5 Minuten"})
    job = timer["payload"]["job_id"]
    assert timer == agree("intent timer", job_id=job, conversation_id=job)
    keyed = {
        "text": "Stell einen Timer auf 2 Minuten",
        "idempotency_key": "k1",
        "context": {"timezone": "Europe/Berlin"},
    }
    first, again = await send("request", keyed), await send("request", keyed)
    assert first == again and first["payload"]["job_id"] != job
    reminder = await send(
        "request",
        {
            "text": "Erinnere mich morgen um 9 an den Zahnarzt",
            "context": {"timezone": "Europe/Berlin"},
        },
    )
    assert reminder["payload"]["text"] == "intent reminder"
    assert await send("request", {"text": "Bestelle Pizza"}) == refuse(
        "planner", intents.NO_PLANNER
    )
    assert await send(
        "request", {"text": "in 5 Minuten", "context": {"timezone": "Mars/Base"}}
    ) == (
        refuse(
            "invalid",
            "The time zone 'Mars/Base' is not an IANA zone name; send one such as "
            "'Europe/Berlin', 'America/New_York' or 'UTC'.",
        )
    )

    plan = {"todos": [{"key": "a", "action": "noop"}]}
    proposed = await send("propose", {"plan": plan, "request": "my plan"})
    pid = proposed["payload"]["job_id"]
    assert proposed == agree("intent explicit", job_id=pid, conversation_id=pid)
    looped = {"todos": [{"key": "a", "action": "noop", "depends_on": ["a"]}]}
    assert await send("propose", {"plan": looped}) == refuse(
        "graph_invalid", "The ToDo 'a' depends on itself; remove it from its depends_on."
    )

    assert await send("route", {"to_agent": "laptop-2"}) == refuse(
        "invalid", "A route must embed a request."
    )
    routed = await send("route", {"to_agent": "laptop-2", "request": {"text": "Öffne Spotify"}})
    rid = routed["payload"]["job_id"]
    assert routed == agree("1 ToDo(s) routed to laptop-2", job_id=rid, conversation_id=rid)
    assert await send("route", {"to_agent": "x", "request": {"text": "Bestelle Pizza"}}) == (
        refuse("planner", intents.NO_PLANNER)
    )


async def test_directory_and_notes(send: Send) -> None:
    offer = await send("discover", {"target": "desktop"})
    assert offer == {
        "type": "offer",
        "conversation_id": None,
        "payload": {
            "agent_id": "scheduler",
            "name": "CPA Scheduler",
            "actions": catalogue.default().names("desktop"),
            "intents": intents.default().names(),
        },
    }
    everything = await send("discover", {}, conversation_id="c1")
    assert everything["conversation_id"] == "c1"
    assert everything["payload"]["actions"] == catalogue.default().names(None)
    registered = await send("offer", {"agent_id": "laptop", "actions": ["desktop.open_app"]})
    assert registered == agree("agent laptop registered")
    assert await send("offer", {"actions": []}) == agree("agent desk registered")
    assert await send("assign", {"todo_id": "x", "job_id": "y", "key": "k", "action": "noop"}) == (
        refuse(
            "not_allowed",
            "Only the scheduler assigns ToDos; claim them with POST /v1/agents/claim.",
        )
    )
    for kind, payload in [
        ("agree", {}),
        ("refuse", {"reason": "busy"}),
        ("inform", {"text": "hi"}),
    ]:
        assert await send(kind, payload) == {
            "type": "agree",
            "conversation_id": None,
            "payload": NOTED,
        }


async def test_assignment_answers(send: Send, client: httpx.AsyncClient, member: Member) -> None:
    async def claim(agent_id: str) -> dict[str, Any]:
        r = await client.post(
            "/v1/agents/claim",
            headers=bearer(member),
            json={"agent_id": agent_id, "actions": ["desktop.open_app"], "limit": 1},
        )
        [assign] = r.json()
        return dict(assign["payload"])

    for _ in range(2):
        await client.post("/v1/jobs", headers=bearer(member), json={"request": "Öffne Spotify"})
    a = await claim("desk")
    todo = a["todo_id"]
    assert await send("agree", {"todo_id": todo}) == inform("recorded", todo_id=todo)
    assert await send("inform", {"todo_id": todo, "text": "50%"}) == agree("recorded", todo_id=todo)
    stale = refuse(
        "lease_not_held",
        "The ToDo 'open' is running and not leased to 'other'; claim it again before reporting.",
        todo_id=todo,
    )
    assert await send("done", {"todo_id": todo, "result": 1}, sender="other") == stale
    assert await send("done", {"todo_id": todo, "result": 1}) == agree("done", todo_id=todo)
    assert await send("done", {"todo_id": todo}) == agree("already done", todo_id=todo)
    assert await send("failure", {"todo_id": todo, "error": "x"}) == refuse(
        "lease_not_held",
        "The ToDo 'open' is done and not leased to 'desk'; claim it again before reporting.",
        todo_id=todo,
    )

    b = (await claim("desk"))["todo_id"]
    assert await send("refuse", {"todo_id": b, "reason": "busy"}) == inform(
        "released for another agent", todo_id=b
    )
    b = (await claim("desk"))["todo_id"]
    assert await send("failure", {"todo_id": b, "error": "no app"}) == agree("failed", todo_id=b)


async def test_confirmations(send: Send, client: httpx.AsyncClient, member: Member) -> None:
    mail = (
        await client.post(
            "/v1/jobs", headers=bearer(member), json={"request": "Sende eine Mail an a@b.de: Hallo"}
        )
    ).json()
    [todo] = [t["id"] for t in mail["todos"] if t["requires_confirmation"]]
    assert await send("confirm", {"job_id": mail["id"]}) == inform(
        "1 ToDo(s) approved", job_id=mail["id"]
    )
    assert await send("confirm", {"job_id": mail["id"]}) == inform(
        "0 ToDo(s) approved", job_id=mail["id"]
    )
    assert await send("confirm", {"todo_id": todo, "approved": False}) == inform(
        "1 ToDo(s) declined", todo_id=todo
    )


async def test_problems(client: httpx.AsyncClient, member: Member, wire: Any) -> None:
    async def post(body: Any) -> httpx.Response:
        return await client.post("/v1/messages", headers=bearer(member), json=body)

    missing = await post(message("done", {"todo_id": str(uuid.uuid4())}))
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"
    bad = await post(message("done", {}))
    assert bad.status_code == 422 and bad.json()["code"] == "message_invalid"
    assert "payload.todo_id" in bad.json()["detail"]
    assert bad.headers["content-type"].startswith("application/problem+json")
    foreign = await post(message("confirm", {"job_id": str(uuid.uuid4())}))
    assert foreign.status_code == 200 and foreign.json()["payload"]["text"] == "0 ToDo(s) approved"
    anonymous = await client.post("/v1/messages", json=message("discover", {}))
    assert anonymous.status_code == 401 and anonymous.json()["code"] == "unauthenticated"

    wire(rate_limit=1, rate_window=60)
    first = await post(message("request", {"text": "Stell einen Timer auf 5 Minuten"}))
    assert first.json()["type"] == "agree"
    limited = (await post(message("request", {"text": "Stell einen Timer auf 5 Minuten"}))).json()
    assert limited["type"] == "refuse" and limited["payload"]["code"] == "rate_limited"
    # The refused request leaves no job behind (its creation is rolled back to a savepoint).
    jobs = (await client.get("/v1/jobs", headers=bearer(member))).json()["jobs"]
    assert [j["id"] for j in jobs] == [first.json()["payload"]["job_id"]]
