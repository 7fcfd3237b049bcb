"""The API's Lambda handler (Mangum) with committed API Gateway v2 and Function URL events."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

from cpa_scheduler import auth, service, settings, store

from functions import api
from tests.conftest import MemberFactory
from tests.functions.conftest import ISSUER, SECRET, token_for

EVENTS = Path(__file__).parents[1] / "fixtures" / "events"


class Context:
    function_name = "cpa-api"
    aws_request_id = "req-1"

    def get_remaining_time_in_millis(self) -> int:
        return 10_000


def invoke(event: dict[str, Any], db_url: str, config: settings.Settings) -> dict[str, Any]:
    """Call the handler in a thread of its own, as Lambda does: its own loop, its own pool."""
    db = store.Store(db_url)
    verifier = auth.Verifier(hs256_secret=SECRET, issuer=ISSUER)
    api.app.state.services = service.Services(config, db, verifier=verifier)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return api.handler(event, Context())  # type: ignore[no-any-return]
    finally:
        loop.run_until_complete(db.close())
        loop.close()
        asyncio.set_event_loop(None)
        api.app.state.services = None


async def test_function_url_healthz(db_url: str, config: settings.Settings) -> None:
    event = json.loads((EVENTS / "function_url_get_healthz.json").read_text())
    answer = await asyncio.to_thread(invoke, event, db_url, config)
    assert answer["statusCode"] == 200 and json.loads(answer["body"]) == {"status": "ok"}


async def test_function_url_serves_the_jobs_page_with_its_csp(
    db_url: str, config: settings.Settings
) -> None:
    event = json.loads((EVENTS / "function_url_get_healthz.json").read_text())
    for path, kind in (("/ui/", "text/html"), ("/ui/assets/graph.js", "text/javascript")):
        event["rawPath"] = event["requestContext"]["http"]["path"] = path
        answer = await asyncio.to_thread(invoke, event, db_url, config)
        assert answer["statusCode"] == 200, answer
        headers = {k.lower(): v for k, v in answer["headers"].items()}
        assert headers["content-type"].startswith(kind)
        assert "default-src 'self'" in headers["content-security-policy"]
        body = base64.b64decode(answer["body"]) if answer["isBase64Encoded"] else answer["body"]
        assert len(body) > 100


async def test_bad_environment_is_an_http_answer_naming_the_variable(
    db_url: str, monkeypatch: Any
) -> None:
    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.setenv("CPA_LOG_LEVEL", "loud")
    monkeypatch.setattr(api, "_mangum", None)  # the first event of a new container
    event = json.loads((EVENTS / "apigw_v2_post_jobs.json").read_text())

    def first_event() -> dict[str, Any]:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            return api.handler(event, Context())  # type: ignore[no-any-return]
        finally:
            loop.close()
            asyncio.set_event_loop(None)
            api.app.state.services = None

    answer = await asyncio.to_thread(first_event)
    assert answer["statusCode"] == 500  # the operator's to fix, not the caller's
    body = base64.b64decode(answer["body"]) if answer["isBase64Encoded"] else answer["body"]
    problem = json.loads(body)
    assert problem["code"] == "config_invalid" and "CPA_LOG_LEVEL" in problem["detail"]


async def test_api_gateway_v2_post_job(
    db_url: str, db: store.Store, config: settings.Settings, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    token = token_for(m)
    raw = (EVENTS / "apigw_v2_post_jobs.json").read_text().replace("{{token}}", token)
    answer = await asyncio.to_thread(invoke, json.loads(raw), db_url, config)
    assert answer["statusCode"] == 201, answer["body"]
    job = json.loads(answer["body"])
    assert job["intent"] == "timer" and len(job["todos"]) == 2
    again = await asyncio.to_thread(invoke, json.loads(raw), db_url, config)
    assert json.loads(again["body"])["id"] == job["id"]  # Idempotency-Key honoured
    unauth = json.loads(raw.replace(token, "x"))
    denied = await asyncio.to_thread(invoke, unauth, db_url, config)
    assert denied["statusCode"] == 401
    assert denied["headers"]["content-type"].startswith("application/problem+json")


def _a2a_event(token: str, body: dict[str, Any], path: str = "/a2a") -> dict[str, Any]:
    event: dict[str, Any] = json.loads((EVENTS / "apigw_v2_post_jobs.json").read_text())
    event["rawPath"] = event["requestContext"]["http"]["path"] = path
    headers = event["headers"]
    del headers["idempotency-key"]
    headers["authorization"] = f"Bearer {token}"
    headers["a2a-version"] = "1.0"
    if path != "/a2a":
        event["requestContext"]["http"]["method"] = "GET"
        del event["body"]
    else:
        event["body"] = json.dumps(body)
    return event


async def test_a2a_behind_lambda(
    db_url: str, config: settings.Settings, member_factory: MemberFactory
) -> None:
    """The card names the public URL; a stream answers within the bound (buffered), and the
    caller resubscribes with the last cpa.event_id."""
    m = await member_factory()
    token = token_for(m)
    card = await asyncio.to_thread(
        invoke, _a2a_event(token, {}, "/.well-known/agent-card.json"), db_url, config
    )
    [interface] = json.loads(card["body"])["supportedInterfaces"]
    assert interface["url"] == "https://abc123.execute-api.eu-central-1.amazonaws.com/a2a"
    todos = [{"key": "a", "action": "noop"}]  # no dispatcher runs: the job stays submitted
    message = {"messageId": "l1", "role": "ROLE_USER", "parts": [{"data": {"graph": {"todos": todos}}}]}  # fmt: skip
    body = {"jsonrpc": "2.0", "id": 1, "method": "SendStreamingMessage", "params": {"message": message}}  # fmt: skip
    bounded = config.model_copy(update={"events_bound": 1.0})
    answer = await asyncio.to_thread(invoke, _a2a_event(token, body), db_url, bounded)
    assert answer["statusCode"] == 200
    text = (
        base64.b64decode(answer["body"]).decode() if answer["isBase64Encoded"] else answer["body"]
    )
    results = [json.loads(line[5:])["result"] for line in text.splitlines() if line.startswith("data:")]  # fmt: skip
    assert results[0]["task"]["status"]["state"] == "TASK_STATE_SUBMITTED"
    assert results[-1]["statusUpdate"]["metadata"]["cpa.event_id"] > 0
