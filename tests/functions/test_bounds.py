"""Bounded input at the API: nesting depth, unencodable text, idempotency mismatches, and one
answer for another tenant's ToDo and an unknown one."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
from cpa_scheduler import store

from tests.conftest import JobFactory, MemberFactory
from tests.functions.conftest import bearer


def _deep(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = {"a": value}
    return value


def _problem(r: httpx.Response, *statuses: int) -> dict[str, Any]:
    assert r.status_code in statuses, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = r.json()
    return body


async def test_deep_params_are_a_422_and_the_job_list_still_works(
    client: httpx.AsyncClient, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    graph = {"todos": [{"key": "a", "action": "noop", "params": {"x": _deep(300)}}]}
    r = await client.post("/v1/jobs", headers=bearer(m), json={"graph": graph})
    assert "64 levels" in _problem(r, 422)["detail"]
    assert (await client.get("/v1/jobs", headers=bearer(m))).status_code == 200


async def test_a_deep_done_result_is_refused_and_the_job_stays_readable(
    client: httpx.AsyncClient, member_factory: MemberFactory, db: store.Store
) -> None:
    m = await member_factory()
    graph = {"todos": [{"key": "o", "action": "desktop.open_app", "params": {"app": "X"}}]}
    job = (await client.post("/v1/jobs", headers=bearer(m), json={"graph": graph})).json()
    [assign] = (
        await client.post("/v1/agents/claim", headers=bearer(m), json={"agent_id": "laptop"})
    ).json()
    done = {
        "type": "done",
        "sender": "laptop",
        "receiver": "scheduler",
        "payload": {"todo_id": assign["payload"]["todo_id"], "result": _deep(300)},
    }
    r = await client.post("/v1/messages", headers=bearer(m), json=done)
    assert "64 levels" in _problem(r, 422)["detail"]
    assert (await client.get(f"/v1/jobs/{job['id']}", headers=bearer(m))).status_code == 200


async def test_lone_surrogates_are_a_422_not_a_500(
    client: httpx.AsyncClient, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    headers = {**bearer(m), "content-type": "application/json"}
    offer = (
        b'{"type": "offer", "sender": "laptop", "receiver": "scheduler",'
        b' "payload": {"agent_id": "laptop", "name": "\\ud800", "actions": []}}'
    )
    r = await client.post("/v1/messages", headers=headers, content=offer)
    assert "surrogate" in _problem(r, 422)["detail"]
    request = b'{"request": "Erinnere mich \\udfff"}'
    r = await client.post("/v1/jobs", headers=headers, content=request)
    assert "unicode" in _problem(r, 422)["detail"].lower()
    graph = b'{"graph": {"todos": [{"key": "a", "action": "noop", "params": {"t": "\\ud83d"}}]}}'
    r = await client.post("/v1/jobs", headers=headers, content=graph)
    assert "surrogate" in _problem(r, 422)["detail"]


async def test_idempotency_key_with_another_body_is_a_409(
    client: httpx.AsyncClient, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    headers = {**bearer(m), "Idempotency-Key": "order-7"}
    first = await client.post("/v1/jobs", headers=headers, json={"request": "Öffne Spotify"})
    assert first.status_code == 201
    # The same body with other spacing and key order is a replay.
    replay = await client.post(
        "/v1/jobs",
        headers={**headers, "content-type": "application/json"},
        content=json.dumps({"request": "Öffne Spotify"}, indent=2).encode(),
    )
    assert replay.status_code == 201 and replay.json()["id"] == first.json()["id"]
    other = await client.post("/v1/jobs", headers=headers, json={"request": "Öffne Slack"})
    detail = _problem(other, 409)["detail"]
    assert "order-7" in detail and "different body" in detail
    # Another tenant may use the same key for its own job.
    n = await member_factory()
    theirs = await client.post(
        "/v1/jobs", headers={**bearer(n), "Idempotency-Key": "order-7"}, json={"request": "x y"}
    )
    assert theirs.status_code in (201, 422)


async def test_another_tenants_todo_reads_like_an_unknown_one(
    client: httpx.AsyncClient,
    member_factory: MemberFactory,
    job_factory: JobFactory,
    db: store.Store,
) -> None:
    a = await member_factory("A")
    b = await member_factory("B")
    job = await job_factory(
        b, [{"key": "o", "action": "desktop.open_app", "target": "desktop", "params": {"app": "X"}}]
    )
    async with db.service() as s:
        [todo] = await s.job_todos(job.id)

    async def answers(todo_id: str) -> list[tuple[int, str]]:
        out = []
        for kind, payload in (
            ("agree", {"todo_id": todo_id}),
            ("inform", {"todo_id": todo_id, "text": "50%"}),
            ("confirm", {"todo_id": todo_id}),
            ("done", {"todo_id": todo_id, "result": {}}),
            ("failure", {"todo_id": todo_id, "error": "x"}),
            ("refuse", {"todo_id": todo_id, "reason": "busy"}),
        ):
            msg = {"type": kind, "sender": "laptop", "receiver": "scheduler", "payload": payload}
            r = await client.post("/v1/messages", headers=bearer(a), json=msg)
            detail = str(r.json().get("detail", r.json().get("type"))).replace(todo_id, "<id>")
            out.append((r.status_code, detail))
        return out

    foreign = await answers(str(todo["id"]))
    unknown = await answers(str(uuid.uuid4()))
    assert foreign == unknown
    assert {status for status, _ in foreign} == {404}
