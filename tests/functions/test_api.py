"""The HTTP API over the ASGI app against real Postgres."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
from cpa_scheduler import dispatch, store

from tests.conftest import Member, MemberFactory
from tests.functions.conftest import bearer


def is_problem(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["status"] == status and body["detail"]
    if code:
        assert body["code"] == code
    return body


async def test_create_from_german_text(
    client: httpx.AsyncClient, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    r = await client.post(
        "/v1/jobs", json={"request": "Stell einen Timer auf 1 Sekunden"}, headers=bearer(m)
    )
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["status"] == "pending" and job["intent"] == "timer"
    assert [t["key"] for t in job["todos"]] == ["wait", "ring"]
    ring = job["todos"][1]
    assert (
        ring["depends_on"] == ["wait"] and ring["status"] == "waiting" and ring["target"] == "cloud"
    )
    for field in [
        "id",
        "key",
        "action",
        "target",
        "status",
        "depends_on",
        "params",
        "result",
        "error",
        "attempts",
        "started_at",
        "finished_at",
    ]:
        assert field in ring
    got = await client.get(f"/v1/jobs/{job['id']}", headers=bearer(m))
    assert got.status_code == 200 and got.json()["id"] == job["id"]


async def test_explicit_graph_and_validation_errors(
    client: httpx.AsyncClient, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    ok = await client.post(
        "/v1/jobs",
        headers=bearer(m),
        json={
            "graph": {
                "todos": [
                    {
                        "key": "a",
                        "action": "noop",
                        "params": {"x": 1},
                        "depends_on": [],
                        "target": "cloud",
                    },
                    {
                        "key": "b",
                        "action": "notify",
                        "params": {"message": {"$ref": "a.result.x"}},
                        "depends_on": ["a"],
                    },
                ]
            }
        },
    )
    assert ok.status_code == 201 and ok.json()["intent"] == "explicit"
    cycle = await client.post(
        "/v1/jobs",
        headers=bearer(m),
        json={
            "graph": {
                "todos": [
                    {"key": "a", "action": "noop", "depends_on": ["b"]},
                    {"key": "b", "action": "noop", "depends_on": ["a"]},
                ]
            }
        },
    )
    assert "a -> b -> a" in is_problem(cycle, 422, "graph_cycle")["detail"]
    unknown = await client.post(
        "/v1/jobs", headers=bearer(m), json={"graph": {"todos": [{"key": "a", "action": "fly"}]}}
    )
    assert "'fly'" in is_problem(unknown, 422, "action_invalid")["detail"]
    both = await client.post(
        "/v1/jobs",
        headers=bearer(m),
        json={"request": "x", "graph": {"todos": [{"key": "a", "action": "noop"}]}},
    )
    assert "exactly one" in is_problem(both, 422, "invalid")["detail"]
    bad_json = await client.post(
        "/v1/jobs", headers={**bearer(m), "content-type": "application/json"}, content=b"{no"
    )
    is_problem(bad_json, 422, "invalid")
    big_graph = await client.post(
        "/v1/jobs",
        headers=bearer(m),
        json={"graph": {"todos": [{"key": f"k{i}", "action": "noop"} for i in range(501)]}},
    )
    is_problem(big_graph, 413, "graph_too_large")
    huge = await client.post("/v1/jobs", headers=bearer(m), json={"request": "x" * 300_000})
    is_problem(huge, 413, "body_too_large")


async def test_unknown_request_without_planner_is_a_clear_4xx(
    client: httpx.AsyncClient, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    r = await client.post(
        "/v1/jobs", headers=bearer(m), json={"request": "Bestelle eine Pizza Margherita"}
    )
    assert "set OPENAI_API_KEY or OPENAI_BASE_URL" in is_problem(r, 422, "planner")["detail"]


async def test_idempotency_key(client: httpx.AsyncClient, member_factory: MemberFactory) -> None:
    m = await member_factory()
    headers = {**bearer(m), "Idempotency-Key": "order-42"}
    first = await client.post("/v1/jobs", headers=headers, json={"request": "Öffne Spotify"})
    second = await client.post("/v1/jobs", headers=headers, json={"request": "Öffne Spotify"})
    assert first.status_code == second.status_code == 201
    assert first.json()["id"] == second.json()["id"]
    listed = await client.get("/v1/jobs", headers=bearer(m))
    assert len(listed.json()["jobs"]) == 1


async def test_tokens(client: httpx.AsyncClient, member_factory: MemberFactory) -> None:
    m = await member_factory()
    is_problem(await client.get("/v1/jobs"), 401, "unauthenticated")
    is_problem(await client.get("/v1/jobs", headers={"Authorization": "Bearer nonsense"}), 401)
    expired = await client.get("/v1/jobs", headers=bearer(m, ttl=-60))
    assert "expired" in is_problem(expired, 401)["detail"]
    wrong_iss = await client.get(
        "/v1/jobs", headers=bearer(m, issuer="https://other.supabase.co/auth/v1")
    )
    assert "another project" in is_problem(wrong_iss, 401)["detail"]
    token = bearer(m)["Authorization"]
    head, payload, sig = token.split(".")
    tampered = f"{head}.{payload}.{sig[:-4]}AAAA"
    assert (
        "signature"
        in is_problem(await client.get("/v1/jobs", headers={"Authorization": tampered}), 401)[
            "detail"
        ]
    )
    import jwt

    from tests.functions.conftest import ISSUER, SECRET

    aud = jwt.encode(
        {
            "sub": str(m.user_id),
            "aud": "anon",
            "role": "authenticated",
            "iss": ISSUER,
            "exp": 9999999999,
        },
        SECRET,
    )
    assert (
        "'authenticated'"
        in is_problem(
            await client.get("/v1/jobs", headers={"Authorization": f"Bearer {aud}"}), 401
        )["detail"]
    )


async def test_tenant_isolation(client: httpx.AsyncClient, member_factory: MemberFactory) -> None:
    a, b = await member_factory("A"), await member_factory("B")
    job = (
        await client.post("/v1/jobs", headers=bearer(a), json={"request": "Öffne Spotify"})
    ).json()
    for method, path in [
        ("GET", f"/v1/jobs/{job['id']}"),
        ("POST", f"/v1/jobs/{job['id']}/cancel"),
        ("POST", f"/v1/jobs/{job['id']}/retry"),
        ("GET", f"/v1/jobs/{job['id']}/events"),
    ]:
        is_problem(await client.request(method, path, headers=bearer(b)), 404, "not_found")
    assert (await client.get("/v1/jobs", headers=bearer(b))).json()["jobs"] == []
    other = await client.get("/v1/jobs", headers={**bearer(a), "X-CPA-Tenant": str(b.tenant_id)})
    is_problem(other, 404)


async def test_cancel_retry_and_conflicts(
    client: httpx.AsyncClient, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    job = (
        await client.post("/v1/jobs", headers=bearer(m), json={"request": "Öffne Spotify"})
    ).json()
    conflict = await client.post(f"/v1/jobs/{job['id']}/retry", headers=bearer(m))
    assert "only failed or cancelled" in is_problem(conflict, 409, "conflict")["detail"]
    cancelled = await client.post(f"/v1/jobs/{job['id']}/cancel", headers=bearer(m))
    assert cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["todos"][0]["status"] == "cancelled"
    retried = await client.post(f"/v1/jobs/{job['id']}/retry", headers=bearer(m))
    assert retried.json()["status"] == "pending"
    is_problem(await client.get("/v1/jobs/not-a-uuid", headers=bearer(m)), 422)
    is_problem(
        await client.get("/v1/jobs/00000000-0000-0000-0000-000000000000", headers=bearer(m)), 404
    )


async def test_list_with_cursor(client: httpx.AsyncClient, member_factory: MemberFactory) -> None:
    m = await member_factory()
    ids = [
        (
            await client.post("/v1/jobs", headers=bearer(m), json={"request": f"Öffne App{i}"})
        ).json()["id"]
        for i in range(5)
    ]
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/v1/jobs", headers=bearer(m), params=params)).json()
        seen += [j["id"] for j in page["jobs"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert sorted(seen) == sorted(ids) and len(seen) == 5
    assert (await client.get("/v1/jobs", headers=bearer(m), params={"status": "done"})).json()[
        "jobs"
    ] == []
    is_problem(await client.get("/v1/jobs", headers=bearer(m), params={"cursor": "garbage"}), 422)


async def test_desktop_flow_through_claim_and_done(
    client: httpx.AsyncClient, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    job = (
        await client.post("/v1/jobs", headers=bearer(m), json={"request": "Öffne Spotify"})
    ).json()
    r = await client.post(
        "/v1/agents/claim",
        headers=bearer(m),
        json={"agent_id": "laptop", "actions": ["desktop.open_app"], "limit": 5},
    )
    assert r.status_code == 200
    [assign] = r.json()
    assert assign["type"] == "assign" and assign["receiver"] == "laptop"
    assert (
        assign["payload"]["params"] == {"app": "Spotify"}
        and assign["payload"]["job_id"] == job["id"]
    )
    done = {
        "type": "done",
        "sender": "laptop",
        "receiver": "scheduler",
        "in_reply_to": assign["id"],
        "conversation_id": job["id"],
        "payload": {"todo_id": assign["payload"]["todo_id"], "result": {"opened": True}},
    }
    answer = await client.post("/v1/messages", headers=bearer(m), json=done)
    assert answer.json()["type"] == "agree"
    final = (await client.get(f"/v1/jobs/{job['id']}", headers=bearer(m))).json()
    assert final["status"] == "done" and final["todos"][0]["result"] == {"opened": True}


async def test_every_message_type_has_an_answer(
    client: httpx.AsyncClient, member_factory: MemberFactory
) -> None:
    m = await member_factory()

    async def send(kind: str, payload: dict[str, Any]) -> dict[str, Any]:
        r = await client.post(
            "/v1/messages",
            headers=bearer(m),
            json={"type": kind, "sender": "desk", "receiver": "scheduler", "payload": payload},
        )
        assert r.status_code == 200, r.text
        return r.json()

    agree = await send("request", {"text": "Stell einen Timer auf 5 Minuten"})
    assert agree["type"] == "agree" and agree["conversation_id"] == agree["payload"]["job_id"]
    assert (await send("request", {"text": "Bestelle Pizza"}))["type"] == "refuse"
    offer = await send("discover", {})
    assert (
        offer["type"] == "offer"
        and "noop" in offer["payload"]["actions"]
        and "timer" in offer["payload"]["intents"]
    )
    assert (await send("offer", {"agent_id": "laptop", "actions": ["desktop.open_app"]}))[
        "type"
    ] == "agree"
    assert (await send("assign", {"todo_id": "x", "job_id": "y", "key": "k", "action": "noop"}))[
        "type"
    ] == "refuse"
    proposed = await send(
        "propose", {"plan": {"todos": [{"key": "a", "action": "noop"}]}, "request": "my plan"}
    )
    assert proposed["type"] == "agree"
    bad_plan = await send(
        "propose", {"plan": {"todos": [{"key": "a", "action": "noop", "depends_on": ["a"]}]}}
    )
    assert bad_plan["type"] == "refuse" and "depends on itself" in bad_plan["payload"]["reason"]
    routed = await send("route", {"to_agent": "laptop-2", "request": {"text": "Öffne Spotify"}})
    assert routed["type"] == "agree" and "1 ToDo(s) routed to laptop-2" in routed["payload"]["text"]
    other = await client.post(
        "/v1/agents/claim",
        headers=bearer(m),
        json={"agent_id": "laptop-1", "actions": ["desktop.open_app"]},
    )
    assert other.json() == []  # routed to laptop-2 only
    mine = await client.post(
        "/v1/agents/claim",
        headers=bearer(m),
        json={"agent_id": "laptop-2", "actions": ["desktop.open_app"]},
    )
    assert [a["payload"]["job_id"] for a in mine.json()] == [routed["payload"]["job_id"]]
    mail = (
        await client.post(
            "/v1/jobs", headers=bearer(m), json={"request": "Sende eine Mail an a@b.de: Hallo"}
        )
    ).json()
    confirmed = await send("confirm", {"job_id": mail["id"]})
    assert confirmed["type"] == "inform" and "1 ToDo(s) approved" in confirmed["payload"]["text"]
    assert (await send("inform", {"text": "hello"}))["type"] == "agree"
    invalid = await client.post(
        "/v1/messages",
        headers=bearer(m),
        json={"type": "done", "sender": "a", "receiver": "b", "payload": {}},
    )
    assert "payload.todo_id" in is_problem(invalid, 422, "message_invalid")["detail"]


async def test_rate_limit_postgres(
    app: Any, wire: Any, member_factory: MemberFactory, db: store.Store
) -> None:
    wire(rate_limit=2, rate_window=60)
    m = await member_factory()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        for _ in range(2):
            assert (
                await c.post("/v1/jobs", headers=bearer(m), json={"request": "Öffne Spotify"})
            ).status_code == 201
        limited = await c.post("/v1/jobs", headers=bearer(m), json={"request": "Öffne Spotify"})
    is_problem(limited, 429, "rate_limited")
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    async with db.user(m.claims) as s:  # the refused request created nothing
        assert len(await s.job_list(tenant_id=m.tenant_id, status=None, before=None, limit=10)) == 2


async def test_create_answers_what_get_answers_and_picks_the_tenant(
    client: httpx.AsyncClient, member_factory: MemberFactory, db: store.Store
) -> None:
    """POST /v1/jobs is one SQL call (cpa.job_submit_v3): its answer is the job as GET reads it,
    for the caller's own tenant or the one X-CPA-Tenant names, and 404 for anyone else's."""
    from datetime import datetime

    a, b = await member_factory("A"), await member_factory("B")
    graph = {"todos": [{"key": "x", "action": "noop", "params": {"n": 1}},
                       {"key": "y", "action": "noop", "depends_on": ["x"]}]}  # fmt: skip
    created = await client.post(
        "/v1/jobs", headers={**bearer(a), "Idempotency-Key": "k1"}, json={"graph": graph}
    )
    assert created.status_code == 201 and created.headers["content-type"] == "application/json"
    got = (await client.get(f"/v1/jobs/{created.json()['id']}", headers=bearer(a))).json()

    def same(value: Any) -> Any:  # timestamps compare as instants, not as strings
        if isinstance(value, dict):
            return {k: same(v) for k, v in value.items()}
        if isinstance(value, list):
            return [same(v) for v in value]
        if isinstance(value, str) and len(value) > 19 and value[10:11] == "T":
            return datetime.fromisoformat(value)
        return value

    assert same(created.json()) == same(got)
    assert created.json()["tenant_id"] == str(a.tenant_id)
    assert created.json()["todos"][1]["depends_on"] == ["x"]
    again = await client.post(
        "/v1/jobs", headers={**bearer(a), "Idempotency-Key": "k1"}, json={"graph": graph}
    )
    assert again.status_code == 201 and again.json()["id"] == created.json()["id"]
    is_problem(
        await client.post(
            "/v1/jobs", headers={**bearer(a), "X-CPA-Tenant": str(b.tenant_id)},
            json={"graph": graph},
        ),
        404,
    )  # fmt: skip
    is_problem(
        await client.post(
            "/v1/jobs", headers={**bearer(a), "X-CPA-Tenant": "nope"}, json={"graph": graph}
        ),
        422,
    )


async def test_create_without_a_key_answers_what_get_answers(
    client: httpx.AsyncClient, member_factory: MemberFactory, db: store.Store
) -> None:
    """The one-round-trip path (no Idempotency-Key: cpa.job_submit_v3 through Store.submit):
    committed before the answer, which is the job as GET reads it, with every column the create
    sets (the job's run_at and zone, a ToDo's own later run_at, an agent timeout, dependencies
    given out of order)."""
    from datetime import UTC, datetime, timedelta

    m = await member_factory("A")
    soon = datetime.now(UTC) + timedelta(hours=1)
    graph = {"todos": [
        {"key": "z", "action": "noop", "params": {"duration_ms": 1}},
        {"key": "a", "action": "noop"},
        {"key": "o", "action": "desktop.open_app", "target": "desktop", "params": {"app": "X"},
         "depends_on": ["z", "a"], "agent_timeout": 30,
         "run_at": (soon + timedelta(hours=2)).isoformat()},
    ]}  # fmt: skip
    created = await client.post(
        "/v1/jobs",
        headers=bearer(m),
        json={"graph": graph, "run_at": soon.isoformat(), "time_zone": "Europe/Berlin"},
    )
    assert created.status_code == 201, created.text
    got = await client.get(f"/v1/jobs/{created.json()['id']}", headers=bearer(m))
    assert got.status_code == 200

    def instants(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: instants(v) for k, v in value.items()}
        if isinstance(value, list):
            return [instants(v) for v in value]
        if isinstance(value, str) and len(value) > 19 and value[10:11] == "T":
            return datetime.fromisoformat(value)
        return value

    assert instants(created.json()) == instants(got.json())
    todos = created.json()["todos"]
    assert [t["depends_on"] for t in todos] == [[], [], ["a", "z"]]
    assert instants(todos[2]["run_at"]) == soon + timedelta(hours=2)
    assert instants(created.json()["run_at"]) == soon


async def test_health_and_readiness(client: httpx.AsyncClient, wire: Any, db: store.Store) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).status_code == 200
    st = wire()
    st.store = store.Store("postgresql://nobody@127.0.0.1:1/none")
    r = await client.get("/readyz")
    assert r.status_code == 503 and r.headers["Retry-After"] == "5"


async def test_sse_resume_loses_and_repeats_nothing(
    live_api: str, db: store.Store, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    graph = {
        "todos": [
            {
                "key": f"s{i}",
                "action": "noop",
                "params": {"duration_ms": 80},
                "depends_on": [f"s{i - 1}"] if i else [],
            }
            for i in range(6)
        ]
    }
    async with httpx.AsyncClient(base_url=live_api, timeout=20) as c:
        job = (await c.post("/v1/jobs", headers=bearer(m), json={"graph": graph})).json()
        runner = asyncio.create_task(dispatch.Dispatcher(db).run_pass(30))
        first: list[int] = []
        async with c.stream("GET", f"/v1/jobs/{job['id']}/events", headers=bearer(m)) as stream:
            async for line in stream.aiter_lines():
                if line.startswith("id: "):
                    first.append(int(line[4:]))
                if len(first) >= 5:
                    break  # disconnect mid-job
        second: list[int] = []
        kinds: list[str] = []
        headers = {**bearer(m), "Last-Event-ID": str(first[-1])}
        async with c.stream("GET", f"/v1/jobs/{job['id']}/events", headers=headers) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            async for line in stream.aiter_lines():
                if line.startswith("id: "):
                    second.append(int(line[4:]))
                if line.startswith("data: "):
                    kinds.append(
                        json.loads(line[6:])["kind"] + ":" + str(json.loads(line[6:])["status"])
                    )
        await runner
    async with db.user(m.claims) as s:
        all_ids = [e["id"] for e in await s.event_list(job["id"])]
    assert first + second == all_ids
    assert kinds[-1] == "job.status:done"


async def _job_done(db: store.Store, m: Member, job_id: str) -> bool:
    async with db.user(m.claims) as s:
        return (await s.job_get(job_id))["status"] == "done"


async def test_nul_bytes_are_a_4xx_not_a_500(
    client: httpx.AsyncClient, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    r = await client.post(
        "/v1/agents/claim", headers=bearer(m), json={"agent_id": "a\u0000b", "actions": ["x"]}
    )
    assert "cannot be stored" in is_problem(r, 422, "invalid")["detail"]


async def test_planning_on_request_and_for_unknown_text(
    app: Any, wire: Any, member_factory: MemberFactory
) -> None:
    wire(
        openai_base_url="http://127.0.0.1:9/v1"
    )  # configured; the planner runs later, in the dispatcher
    m = await member_factory()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        forced = await c.post(
            "/v1/jobs", headers=bearer(m), json={"request": "Öffne Spotify", "plan": True}
        )
        unknown = await c.post(
            "/v1/jobs", headers=bearer(m), json={"request": "Bestelle eine Pizza"}
        )
    assert forced.status_code == 201 and forced.json()["intent"] == "planned"
    assert [t["action"] for t in forced.json()["todos"]] == ["plan"]
    assert unknown.json()["intent"] == "unknown"
    assert unknown.json()["todos"][0]["params"] == {"request": "Bestelle eine Pizza"}


async def test_the_answer_is_sent_after_the_commit(
    app: Any, wire: Any, db_url: str, member_factory: MemberFactory
) -> None:
    """A client that reads its job right after the 201 must find it: the request's transaction
    commits before the response leaves (a yield dependency of request scope would commit after
    it, and a commit failure, such as the events flush, would follow an answered 201)."""
    import psycopg

    wire()
    m = await member_factory()
    body = json.dumps({"request": "Stell einen Timer auf 5 Minuten"}).encode()
    headers = [(k.lower().encode(), v.encode()) for k, v in bearer(m).items()]
    headers.append((b"content-type", b"application/json"))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/jobs", "raw_path": b"/v1/jobs", "query_string": b"",
             "root_path": "", "headers": headers, "client": ("127.0.0.1", 1),
             "server": ("test", 80)}  # fmt: skip
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            await asyncio.sleep(3600)
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    seen: list[bool] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            job_id = json.loads(message["body"])["id"]
            async with await psycopg.AsyncConnection.connect(db_url) as other:
                cur = await other.execute("select 1 from public.jobs where id = %s", (job_id,))
                seen.append(await cur.fetchone() is not None)

    await app(scope, receive, send)
    assert seen == [True]
