"""The events route behind Lambda: the real Mangum handler with a recorded Function URL event.

Mangum buffers the whole response, so a stream that waits for the job never reaches the
client. Under Mangum the route answers within a bound and the client resumes by id.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from cpa_scheduler import auth, dispatch, service, settings, store

from functions import api
from tests import events_contract
from tests.conftest import JobFactory, MemberFactory
from tests.functions.conftest import ISSUER, SECRET, token_for

EVENT = Path(__file__).parents[1] / "fixtures" / "events" / "function_url_get_job_events.json"


class Context:
    """The Lambda context Mangum passes on; the route reads the remaining time from it."""

    function_name = "cpa-api"
    aws_request_id = "req-events"

    def __init__(self, remaining_ms: int) -> None:
        self._deadline = time.monotonic() + remaining_ms / 1000

    def get_remaining_time_in_millis(self) -> int:
        return int((self._deadline - time.monotonic()) * 1000)


def request(
    job_id: str, token: str, *, last_event_id: int | None = None, query: str = ""
) -> dict[str, Any]:
    raw = EVENT.read_text().replace("{{job_id}}", job_id).replace("{{token}}", token)
    event = json.loads(raw.replace("{{query}}", query))
    if last_event_id is None:
        del event["headers"]["last-event-id"]
    else:
        event["headers"]["last-event-id"] = str(last_event_id)
    return event


def invoke(
    event: dict[str, Any], db_url: str, config: settings.Settings, remaining_ms: int
) -> tuple[dict[str, Any], float]:
    """Run the handler as Lambda does (own thread, own loop, own pool); returns (answer, s)."""
    db = store.Store(db_url)
    verifier = auth.Verifier(hs256_secret=SECRET, issuer=ISSUER)
    api.app.state.services = service.Services(config, db, verifier=verifier)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    began = time.monotonic()
    try:
        answer = api.handler(event, Context(remaining_ms))
        return answer, time.monotonic() - began
    finally:
        loop.run_until_complete(db.close())
        loop.close()
        asyncio.set_event_loop(None)
        api.app.state.services = None


CHAIN = [
    {"key": "a", "action": "noop", "params": {}},
    {"key": "b", "action": "noop", "params": {}, "depends_on": ["a"]},
    {"key": "c", "action": "noop", "params": {}, "depends_on": ["b"]},
]


async def test_events_answer_within_the_bound_and_resume_exactly(
    db_url: str,
    db: store.Store,
    config: settings.Settings,
    member_factory: MemberFactory,
    job_factory: JobFactory,
) -> None:
    m = await member_factory()
    job = await job_factory(m, CHAIN)
    job_id, token = str(job.id), token_for(m)
    # 4.5 s left in the invocation: the route keeps 3 s for itself, so it answers in ~1.5 s.
    remaining = 4500

    answer, took = await asyncio.to_thread(
        invoke, request(job_id, token), db_url, config, remaining
    )
    assert answer["statusCode"] == 200, answer["body"]
    assert answer["headers"]["content-type"].startswith("text/event-stream")
    seen, retry = events_contract.parse_sse(answer["body"])
    assert retry == 1000 and seen and took < 1.5  # events were there: answered at once

    # Nothing new: the answer comes at the bound, with the retry hint and no event.
    answer, took = await asyncio.to_thread(
        invoke, request(job_id, token, last_event_id=seen[-1]["id"]), db_url, config, remaining
    )
    quiet, retry = events_contract.parse_sse(answer["body"])
    assert answer["statusCode"] == 200 and quiet == [] and retry == 1000
    assert 1.2 < took < 2.5, took

    # The job runs; each call resumes from the last id it got, until the job's last event.
    await dispatch.Dispatcher(db).run_pass(10)
    for _ in range(20):
        answer, _took = await asyncio.to_thread(
            invoke, request(job_id, token, last_event_id=seen[-1]["id"]), db_url, config, remaining
        )
        more, _ = events_contract.parse_sse(answer["body"])
        seen += more
        if events_contract_terminal(seen):
            break
    async with db.user(m.claims) as s:
        stored = [e["id"] for e in await s.event_list(job.id)]
    assert [e["id"] for e in seen] == stored  # nothing lost, nothing repeated
    assert (seen[-1]["kind"], seen[-1]["status"]) == ("job.status", "done")

    # After the last event, a reconnecting EventSource is told to stop.
    answer, _ = await asyncio.to_thread(
        invoke, request(job_id, token, last_event_id=seen[-1]["id"]), db_url, config, remaining
    )
    assert answer["statusCode"] == 204


async def test_json_long_poll_through_mangum(
    db_url: str,
    db: store.Store,
    config: settings.Settings,
    member_factory: MemberFactory,
    job_factory: JobFactory,
) -> None:
    m = await member_factory()
    job = await job_factory(m, CHAIN)
    job_id, token = str(job.id), token_for(m)

    answer, _ = await asyncio.to_thread(
        invoke, request(job_id, token, query="after=0"), db_url, config, 4500
    )
    assert answer["statusCode"] == 200
    assert answer["headers"]["content-type"] == "application/json"
    page = json.loads(answer["body"])
    assert page["done"] is False and page["events"] and page["retry_ms"] == 1000
    for e in page["events"]:
        events_contract.validate(e)
    assert page["last_event_id"] == page["events"][-1]["id"]

    # The poll waits for the next event; the dispatcher produces it meanwhile.
    call = asyncio.create_task(asyncio.to_thread(
        invoke, request(job_id, token, query=f"after={page['last_event_id']}&wait=5"),
        db_url, config, 9000,
    ))  # fmt: skip
    await asyncio.sleep(0.3)
    await dispatch.Dispatcher(db).run_pass(10)
    answer, took = await call
    nxt = json.loads(answer["body"])
    assert nxt["events"] and nxt["events"][0]["id"] > page["last_event_id"] and took < 5

    rest = json.loads(
        (await asyncio.to_thread(
            invoke, request(job_id, token, query=f"after={nxt['last_event_id']}"),
            db_url, config, 4500,
        ))[0]["body"]
    )  # fmt: skip
    assert rest["done"] is True
    async with db.user(m.claims) as s:
        stored = [e["id"] for e in await s.event_list(job.id)]
    got = [e["id"] for e in page["events"] + nxt["events"] + rest["events"]]
    assert got == stored


def events_contract_terminal(events: list[dict[str, Any]]) -> bool:
    return bool(events) and events[-1]["kind"] == "job.status" and events[-1]["status"] == "done"
