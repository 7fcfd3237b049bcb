"""Every positive example of intents.yaml runs to done, as a user would send it.

Desktop actions are performed by a test agent through the same operations the API uses (claim as
the user, complete with results in the shape the plans reference); ``llm.generate`` answers
through a mocked OpenAI endpoint (the HTTP layer only); ``email.send`` is confirmed by the user;
timed ToDos come due by moving their time, not by sleeping.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import httpx2
from cpa_scheduler import catalogue, dispatch, executor, intake, intents, llm, planner, store

from tests.conftest import MemberFactory
from tests.unit.test_planner import chat

DESKTOP = sorted(a.name for a in catalogue.default().actions.values() if a.target == "desktop")
AGENT = "e2e-agent"
# A fixed clock (Monday 09:00 in Berlin): the examples name times ("heute Abend") that the real
# hour could have passed; the test moves timed ToDos to the database's now itself.
CLOCK = datetime(2030, 1, 7, 8, 0, tzinfo=UTC)


def _result(action: str, params: dict[str, Any]) -> dict[str, Any]:
    """What a desktop agent answers: text for the notifications, a start for a found slot."""
    return {"text": f"{action} ok", "start": "2026-12-01T10:00:00+01:00", "params": params}


async def test_every_positive_intent_example_completes(
    db: store.Store, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    async with db.service() as s:
        await s.agent_upsert(m.tenant_id, AGENT, "e2e", DESKTOP)
    examples = [
        (intent.name, text)
        for intent in intents.default().intents
        for text in intent.examples.get("positive", [])
    ]
    jobs: dict[str, tuple[str, str]] = {}
    for name, text in examples:
        async with db.user(m.claims) as s:
            job = await intake.submit(
                s, tenant_id=m.tenant_id, text=text, time_zone="Europe/Berlin",
                planner_configured=True, now=CLOCK,
            )  # fmt: skip
        assert job.intent == name, (text, job.intent)
        jobs[str(job.id)] = (name, text)

    def answer(request: httpx2.Request) -> httpx2.Response:
        return chat("Kurz zusammengefasst: alles erledigt.")

    provider = llm.OpenAIProvider(
        model="gpt-4o-mini", api_key="sk-test", max_retries=0,
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(answer)),
    )  # fmt: skip
    registry = executor.builtin()
    planner.register(registry, provider, None)
    dispatcher = dispatch.Dispatcher(db, registry=registry)
    status: dict[str, str] = {}
    for _ in range(12):
        await dispatcher.run_pass(20)
        async with db.user(m.claims) as s:
            assigned = await s.agent_claim(m.tenant_id, AGENT, DESKTOP, 200)
            if assigned:
                await s.todo_complete([
                    {"id": str(t["id"]), "owner": f"agent:{AGENT}",
                     "result": _result(t["action"], t["params"])} for t in assigned
                ])  # fmt: skip
        async with db.admin() as s:
            cur = await s.conn.execute(
                "select id from public.todos where tenant_id = %s and status = 'confirming'",
                (m.tenant_id,),
            )
            confirming = [r["id"] for r in await cur.fetchall()]
            # The clock moves on: reminders and timers come due now.
            await s.conn.execute(
                "update public.todos set run_at = least(run_at, now()), run_after = now() "
                "where tenant_id = %s and status = 'ready' and run_after > now()",
                (m.tenant_id,),
            )
        for todo_id in confirming:  # the user approves each mail
            async with db.user(m.claims) as s:
                await s.todo_confirm(todo_id)
        async with db.user(m.claims) as s:
            status = {str(j.id): j.status for j in await s.job_list(limit=500)}
        if all(status[j] == "done" for j in jobs):
            break
    unfinished = {jobs[j]: status[j] for j in jobs if status[j] != "done"}
    if unfinished:
        async with db.user(m.claims) as s:
            errors = {jobs[j]: (await s.job_get(j)).error for j in jobs if status[j] != "done"}
        raise AssertionError(errors)
