"""One event contract for every channel: SSE on a streaming host and the Realtime broadcast.

Both are validated by docs/events.schema.json, and for each event id the SSE object equals the
broadcast item, so the API and the trigger cannot drift apart.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import httpx
import psycopg
from cpa_scheduler import dispatch, store

from tests import events_contract
from tests.conftest import JobFactory, MemberFactory
from tests.functions.conftest import bearer

GRAPH = {
    "todos": [
        {"key": "a", "action": "noop", "params": {"n": 1}},
        {"key": "tell", "action": "notify", "params": {"title": "CPA", "message": "Tee!"},
         "depends_on": ["a"]},
        {"key": "b", "action": "noop", "params": {"duration_ms": 50}, "depends_on": ["tell"]},
    ]
}  # fmt: skip


async def test_sse_and_broadcast_carry_the_same_valid_events(
    live_api: str, db_url: str, db: store.Store, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    async with httpx.AsyncClient(base_url=live_api, timeout=20) as c:
        job = (await c.post("/v1/jobs", headers=bearer(m), json={"graph": GRAPH})).json()
        runner = asyncio.create_task(dispatch.Dispatcher(db).run_pass(20))
        async with c.stream("GET", f"/v1/jobs/{job['id']}/events", headers=bearer(m)) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            body = (await r.aread()).decode()  # a streaming host holds it open until the end
        await runner
    sse, retry = events_contract.parse_sse(body)
    assert retry == 1000
    assert (sse[-1]["kind"], sse[-1]["status"]) == ("job.status", "done")
    assert {e["kind"] for e in sse} == {"job.status", "todo.status", "notification"}

    with psycopg.connect(db_url) as conn:
        payloads = [
            row[0]
            for row in conn.execute(
                "select payload from realtime.messages where topic = %s",
                (f"tenant:{m.tenant_id}",),
            ).fetchall()
        ]
    broadcast = {
        e["id"]: events_contract.validate(e)
        for p in payloads
        for e in p["events"]
        if e["job_id"] == job["id"]
    }
    assert sorted(broadcast) == [e["id"] for e in sse]
    for event in sse:
        assert _same(event, broadcast[event["id"]])


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal, with created_at compared as instants (Postgres trims trailing zeros)."""
    when = datetime.fromisoformat(a["created_at"]) == datetime.fromisoformat(b["created_at"])
    rest = {k: v for k, v in a.items() if k != "created_at"}
    return when and rest == {k: v for k, v in b.items() if k != "created_at"}


async def test_bad_resume_points_are_a_clear_4xx(
    client: httpx.AsyncClient, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    job = await job_factory(m)
    url = f"/v1/jobs/{job.id}/events"
    for bad in ("abc", "-1", str(2**63)):
        r = await client.get(url, headers={**bearer(m), "Last-Event-ID": bad})
        assert r.status_code == 422, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        assert repr(bad) in r.json()["detail"]
    r = await client.get(url, params={"after": -1}, headers=bearer(m))
    assert r.status_code == 422 and "after" in r.text
    other = await member_factory()
    r = await client.get(url, params={"after": 0}, headers=bearer(other))
    assert r.status_code == 404  # another tenant's job, on the JSON variant too


async def test_a_job_ending_during_a_poll_still_delivers_its_last_events(
    client: httpx.AsyncClient,
    db_url: str,
    member_factory: MemberFactory,
    job_factory: JobFactory,
    monkeypatch: Any,
) -> None:
    """The job ends (and its last events commit) right after the poll read the events: the
    stream must go on to deliver them, not end (or answer 204) because the job has ended."""
    m = await member_factory()
    job = await job_factory(m, [{"key": "a", "action": "noop"}])
    with psycopg.connect(db_url) as conn:
        last = conn.execute(
            "select max(id) from public.job_events where job_id = %s", (job.id,)
        ).fetchone()
    assert last is not None and last[0] is not None
    real = store.Session.event_list
    ended = False

    async def then_the_job_ends(self: store.Session, *args: Any, **kwargs: Any) -> Any:
        nonlocal ended
        rows = await real(self, *args, **kwargs)
        if not ended:
            ended = True
            with psycopg.connect(db_url) as other:  # commits before this poll reads the job
                other.execute(
                    "update public.jobs set status = 'cancelled', completed_at = now()"
                    " where id = %s",
                    (job.id,),
                )
        return rows

    monkeypatch.setattr(store.Session, "event_list", then_the_job_ends)
    headers = {**bearer(m), "Last-Event-ID": str(last[0])}
    r = await client.get(f"/v1/jobs/{job.id}/events", headers=headers)
    assert r.status_code == 200, r.status_code
    sse, _ = events_contract.parse_sse(r.text)
    assert [(e["kind"], e["status"]) for e in sse] == [("job.status", "cancelled")]
