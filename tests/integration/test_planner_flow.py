"""Planning end to end: the plan ToDo in the dispatcher, the cache, and an Ollama-style stub."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from cpa_scheduler import cache as plan_cache
from cpa_scheduler import dispatch, executor, intake, llm, planner, settings, store

from tests.conftest import MemberFactory
from tests.unit.test_planner import Recorder, chat

BRANCHES = {
    "todos": [
        {
            "key": "kisten",
            "action": "noop",
            "target": "cloud",
            "params": {"duration_ms": 20},
            "depends_on": [],
        },
        {
            "key": "termin",
            "action": "noop",
            "target": "cloud",
            "params": {"duration_ms": 20},
            "depends_on": [],
        },
        {
            "key": "fertig",
            "action": "notify",
            "target": "cloud",
            "params": {
                "title": "Umzug",
                "message": {"$ref": "termin.result.duration_ms"},
                "level": None,
            },
            "depends_on": ["kisten", "termin"],
        },
    ]
}
GERMAN = "Organisiere bitte meinen Umzug nach Hamburg nächsten Monat"


async def test_german_request_is_planned_and_runs_to_done(
    db: store.Store, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    async with db.user(m.claims) as s:
        job = await intake.submit(s, tenant_id=m.tenant_id, text=GERMAN, planner_configured=True)
    assert job.intent == "unknown" and job.todo_count == 1  # answered at once: one plan ToDo
    rec = Recorder(chat(BRANCHES))
    registry = executor.builtin()
    planner.register(registry, rec.provider(), plan_cache.PostgresPlanCache(db))
    summary = await dispatch.Dispatcher(db, registry=registry).run_pass(30)
    assert summary.done == 4 and summary.failed == 0
    async with db.user(m.claims) as s:
        final = await s.job_get(job.id)
        todos = {t["key"]: t for t in await s.job_todos(job.id)}
    assert final.status == "done"
    assert list(todos) == ["plan", "kisten", "termin", "fertig"]
    assert todos["fertig"]["depends_on"] == ["kisten", "termin"]
    assert todos["kisten"]["started_at"] < todos["fertig"]["started_at"]
    assert todos["plan"]["result"]["usage"][0]["prompt_tokens"] == 1843
    assert GERMAN in rec.requests[0]["messages"][1]["content"]


async def test_invalid_plan_fails_the_job_with_the_errors(
    db: store.Store, member_factory: MemberFactory
) -> None:
    bad = {
        "todos": [
            {"key": "a", "action": "noop", "target": "cloud", "params": {}, "depends_on": ["ghost"]}
        ]
    }
    m = await member_factory()
    async with db.user(m.claims) as s:
        job = await intake.submit(s, tenant_id=m.tenant_id, text=GERMAN, planner_configured=True)
    rec = Recorder(chat(bad), chat(bad))
    registry = executor.builtin()
    planner.register(registry, rec.provider(), plan_cache.PostgresPlanCache(db))
    await dispatch.Dispatcher(db, registry=registry).run_pass(30)
    async with db.user(m.claims) as s:
        final = await s.job_get(job.id)
    assert final.status == "failed"
    assert "could not produce a valid plan" in final.error and "'ghost'" in final.error


async def test_cache_hit_makes_no_call(db: store.Store, member_factory: MemberFactory) -> None:
    m = await member_factory()
    rec = Recorder(chat(BRANCHES))
    p = planner.Planner(rec.provider(), cache=plan_cache.PostgresPlanCache(db))
    first = await p.plan(GERMAN, tenant_id=str(m.tenant_id))
    second = await p.plan(
        "  organisiere BITTE meinen Umzug nach Hamburg nächsten Monat ", tenant_id=str(m.tenant_id)
    )
    assert first["cached"] is False and second["cached"] is True
    assert second["todos"] == first["todos"] and len(rec.requests) == 1
    other = await member_factory("other")
    with pytest.raises(IndexError):  # another tenant has its own cache: it would call again
        await p.plan(GERMAN, tenant_id=str(other.tenant_id))


@pytest.fixture
def ollama_stub() -> Iterator[dict[str, Any]]:
    seen: dict[str, Any] = {"paths": [], "bodies": []}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen["paths"].append(self.path)
            seen["bodies"].append(body)
            answer = {
                "id": "chatcmpl-417",
                "object": "chat.completion",
                "created": 1795672800,
                "model": body["model"],
                "system_fingerprint": "fp_ollama",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": json.dumps(BRANCHES)},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 900, "completion_tokens": 80, "total_tokens": 980},
            }
            data = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    seen["base_url"] = f"http://127.0.0.1:{server.server_port}/v1"
    yield seen
    server.shutdown()
    server.server_close()


async def test_ollama_compatible_server_through_base_url(ollama_stub: dict[str, Any]) -> None:
    config = settings.Settings(
        database_url="x", openai_base_url=ollama_stub["base_url"], llm_model="llama3.2"
    )
    provider = llm.provider_from(config)
    assert provider is not None
    result = await planner.Planner(provider).plan(GERMAN)
    assert [t["key"] for t in result["todos"]] == ["kisten", "termin", "fertig"]
    assert ollama_stub["paths"] == ["/v1/chat/completions"]
    body = ollama_stub["bodies"][0]
    assert body["model"] == "llama3.2" and body["response_format"]["type"] == "json_schema"


async def test_upstash_plan_cache(member_factory: MemberFactory) -> None:
    from tests.functions.upstash_bridge import bridge

    with bridge("tok") as url:
        cfg = settings.Settings(
            database_url="x", upstash_redis_rest_url=url, upstash_redis_rest_token="tok"
        )
        cache = plan_cache.cache_for(cfg, None)
        assert isinstance(cache, plan_cache.UpstashPlanCache)
        rec = Recorder(chat(BRANCHES))
        p = planner.Planner(rec.provider(), cache=cache)
        tenant = str(__import__("uuid").uuid4())
        assert (await p.plan(GERMAN, tenant_id=tenant))["cached"] is False
        assert (await p.plan(GERMAN, tenant_id=tenant))["cached"] is True
        assert len(rec.requests) == 1
