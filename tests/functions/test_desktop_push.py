"""Each user's own and work pushed to the desktop, over HTTP (issue 21).

Two members of one tenant (Alice, Bob) and its owner: 404 for another's job, events and
schedules, 403 problem+json under another's agent id, ``GET /v1/agents``, the long-polling
claim, and the reference agent's request count while idle (long-poll, and the Realtime double).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from cpa_scheduler import client as client_mod
from cpa_scheduler import desktop, service, store
from fastapi import FastAPI

from tests.conftest import Member, MemberFactory
from tests.functions.conftest import ISSUER, SECRET, bearer, free_port, token_for
from tests.functions.test_api import is_problem
from tests.functions.test_realtime_client import until
from tests.realtime_double import RealtimeDouble

OPEN = {"key": "open", "action": "desktop.open_app", "target": "desktop", "params": {"app": "x"}}
pytestmark = pytest.mark.filterwarnings(
    "ignore:ConnectionClosed.code is deprecated:DeprecationWarning",
    "ignore:ConnectionClosed.reason is deprecated:DeprecationWarning",
)


async def _member(db: store.Store, tenant: Member, role: str = "member") -> Member:
    m = Member(tenant.tenant_id, uuid.uuid4())
    async with db.admin() as s:
        await s.membership_ensure(m.tenant_id, m.user_id, tenant_name="T", role=role,
                                  email=f"{m.user_id}@x.test")  # fmt: skip
    return m


@pytest.fixture
async def team(db: store.Store, member_factory: MemberFactory) -> tuple[Member, Member, Member]:
    """(owner, alice, bob) of one tenant; alice and bob are plain members."""
    owner = await member_factory("T")
    return owner, await _member(db, owner), await _member(db, owner)


@pytest.fixture
async def services(
    wire: Callable[..., service.Services],
) -> AsyncIterator[service.Services]:
    s = wire()
    yield s
    await s.wakeups.close()  # the LISTEN connection of long-polling claims


@pytest.fixture
async def api(app: FastAPI, services: service.Services) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


async def test_bob_gets_404_for_alices_job_events_and_schedules_and_an_admin_reads_them(
    api: httpx.AsyncClient, team: tuple[Member, Member, Member]
) -> None:
    owner, alice, bob = team
    job = (
        await api.post("/v1/jobs", headers=bearer(alice), json={"graph": {"todos": [OPEN]}})
    ).json()
    assert job["created_by"] == str(alice.user_id)
    sched = (await api.post("/v1/schedules", headers=bearer(alice), json={
        "cron": "0 9 * * *", "time_zone": "UTC", "graph": {"todos": [OPEN]}})).json()  # fmt: skip
    paths = [f"/v1/jobs/{job['id']}", f"/v1/jobs/{job['id']}/events?after=0&wait=0",
             f"/v1/schedules/{sched['id']}"]  # fmt: skip
    for path in paths:
        is_problem(await api.get(path, headers=bearer(bob)), 404, "not_found")
        assert (await api.get(path, headers=bearer(alice))).status_code == 200
        assert (await api.get(path, headers=bearer(owner))).status_code == 200
    is_problem(await api.post(f"/v1/jobs/{job['id']}/cancel", headers=bearer(bob)), 404)
    assert (await api.get("/v1/jobs", headers=bearer(bob))).json()["jobs"] == []
    assert (await api.get("/v1/schedules", headers=bearer(bob))).json()["schedules"] == []
    listed = (await api.get("/v1/jobs", headers=bearer(owner))).json()["jobs"]
    assert [(j["id"], j["created_by"]) for j in listed] == [(job["id"], str(alice.user_id))]
    assert (await api.get(f"/v1/jobs/{job['id']}", headers=bearer(alice))).json()["created_by"] == (
        str(alice.user_id)
    )


async def test_alices_desktop_todo_is_never_assigned_to_bobs_agent_also_under_alices_id(
    api: httpx.AsyncClient, team: tuple[Member, Member, Member]
) -> None:
    owner, alice, bob = team
    job = (
        await api.post("/v1/jobs", headers=bearer(alice), json={"graph": {"todos": [OPEN]}})
    ).json()
    claim = {"agent_id": "bob-pc", "actions": ["desktop.open_app"]}
    assert (await api.post("/v1/agents/claim", headers=bearer(bob), json=claim)).json() == []
    # Alice's desktop registers with an action it does not offer for this job: nothing taken.
    alice_claim = {"agent_id": "alice-pc", "actions": ["file.write"]}
    assert (
        await api.post("/v1/agents/claim", headers=bearer(alice), json=alice_claim)
    ).json() == []
    stolen = await api.post("/v1/agents/claim", headers=bearer(bob),
                            json={"agent_id": "alice-pc", "actions": None})  # fmt: skip
    assert "another user" in is_problem(stolen, 403, "forbidden")["detail"]
    todo_id = job["todos"][0]["id"]
    done = {"id": str(uuid.uuid4()), "type": "done", "sender": "alice-pc", "receiver": "scheduler",
            "payload": {"todo_id": todo_id, "result": {}}}  # fmt: skip
    is_problem(await api.post("/v1/messages", headers=bearer(bob), json=done), 403, "forbidden")
    mine = (await api.get(f"/v1/jobs/{job['id']}", headers=bearer(alice))).json()
    assert mine["todos"][0]["status"] == "ready"

    got = (await api.post("/v1/agents/claim", headers=bearer(alice),
                          json={"agent_id": "alice-pc", "actions": None})).json()  # fmt: skip
    assert [a["payload"]["todo_id"] for a in got] == [todo_id]

    # GET /v1/agents: each user's own; the owner sees all (with whose each is).
    def ids(r: httpx.Response) -> dict[str, Any]:
        return {a["agent_id"]: (a["created_by"], a["online"]) for a in r.json()["agents"]}

    assert ids(await api.get("/v1/agents", headers=bearer(alice))) == {
        "alice-pc": (str(alice.user_id), True)
    }
    assert ids(await api.get("/v1/agents", headers=bearer(owner))) == {
        "alice-pc": (str(alice.user_id), True), "bob-pc": (str(bob.user_id), True)
    }  # fmt: skip


async def test_a_long_poll_claim_answers_within_100_ms_of_readiness_and_empty_at_its_bound(
    api: httpx.AsyncClient, team: tuple[Member, Member, Member]
) -> None:
    _, alice, _ = team
    body = {"agent_id": "alice-pc", "actions": None, "wait": 1}
    started = time.monotonic()
    idle = await api.post("/v1/agents/claim", headers=bearer(alice), json=body)
    took = time.monotonic() - started
    assert idle.json() == [] and 1.0 <= took < 3.0  # at its bound (plus a loaded machine)

    lags = []
    for _ in range(3):
        waiting = asyncio.create_task(
            api.post("/v1/agents/claim", headers=bearer(alice), json=body | {"wait": 10})
        )
        await asyncio.sleep(0.3)
        assert not waiting.done()
        job = (
            await api.post("/v1/jobs", headers=bearer(alice), json={"graph": {"todos": [OPEN]}})
        ).json()
        ready = time.monotonic()  # the job's ToDo is ready once its creation answered
        got = (await waiting).json()
        lags.append(time.monotonic() - ready)
        assert [a["payload"]["job_id"] for a in got] == [job["id"]]
    assert max(lags) < 0.1, lags


class Counting(httpx.AsyncBaseTransport):
    """The app's transport, counting requests by path."""

    def __init__(self, app: FastAPI) -> None:
        self.inner = httpx.ASGITransport(app=app)
        self.paths: list[tuple[float, str]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.paths.append((time.monotonic(), request.url.path))
        return await self.inner.handle_async_request(request)


async def _idle_requests(
    app: FastAPI, who: Member, window: float, *, wait: float, heartbeat: float,
    realtime: client_mod.RealtimeConfig | None, tmp_path: Path,
) -> list[str]:  # fmt: skip
    """Requests the reference agent makes in ``window`` idle seconds after it settled."""
    counting = Counting(app)
    async with client_mod.Client("http://test", token_for(who), transport=counting,
                                 realtime=realtime) as c:  # fmt: skip
        task = asyncio.create_task(
            desktop.serve(c, "pc", tmp_path, once=False, wait=wait, heartbeat=heartbeat)
        )
        await asyncio.sleep(1.0)  # offer, first claim (and Realtime: agents, join)
        start = time.monotonic()
        await asyncio.sleep(window)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    return [p for at, p in counting.paths if start <= at < start + window]


@pytest.mark.parametrize("scale", [pytest.param(0.1, id="6s"), pytest.param(1.0, id="60s",
                                                                          marks=pytest.mark.slow)])  # fmt: skip
async def test_the_idle_reference_agent_makes_at_most_three_requests_a_minute_long_polling(
    app: FastAPI, services: service.Services, team: tuple[Member, Member, Member],
    tmp_path: Path, scale: float,
) -> None:  # fmt: skip
    _, alice, _ = team
    got = await _idle_requests(app, alice, 60 * scale, wait=20 * scale, heartbeat=60 * scale,
                               realtime=None, tmp_path=tmp_path)  # fmt: skip
    assert 1 <= len(got) <= 3 and set(got) == {"/v1/agents/claim"}, got


@pytest.mark.parametrize("scale", [pytest.param(0.1, id="6s"), pytest.param(1.0, id="60s",
                                                                          marks=pytest.mark.slow)])  # fmt: skip
async def test_the_idle_reference_agent_makes_at_most_one_request_a_minute_over_realtime(
    app: FastAPI, services: service.Services, db_url: str, team: tuple[Member, Member, Member],
    tmp_path: Path, scale: float,
) -> None:  # fmt: skip
    _, alice, _ = team
    async with RealtimeDouble(db_url, SECRET, ISSUER) as rt:
        config = client_mod.RealtimeConfig(rt.url, "sb_publishable_test-double-key")
        got = await _idle_requests(app, alice, 60 * scale, wait=20 * scale,
                                   heartbeat=60 * scale, realtime=config, tmp_path=tmp_path)  # fmt: skip
        assert [j["accepted"] for j in rt.joins] == [True]
    assert len(got) <= 1, got


async def test_the_reference_agent_over_realtime_runs_alices_todo_at_once(
    app: FastAPI, api: httpx.AsyncClient, db_url: str, team: tuple[Member, Member, Member],
    tmp_path: Path,
) -> None:  # fmt: skip
    _, alice, bob = team
    async with RealtimeDouble(db_url, SECRET, ISSUER) as rt:
        config = client_mod.RealtimeConfig(rt.url, "sb_publishable_test-double-key")
        async with client_mod.Client("http://test", token_for(alice), realtime=config,
                                     transport=httpx.ASGITransport(app=app)) as c:  # fmt: skip
            task = asyncio.create_task(
                desktop.serve(c, "alice-pc", tmp_path, once=False, heartbeat=600)
            )
            await until(lambda: any(j["accepted"] for j in rt.joins))
            await asyncio.sleep(0.3)
            job = (await api.post("/v1/jobs", headers=bearer(alice),
                                  json={"graph": {"todos": [OPEN]}})).json()  # fmt: skip
            started = time.monotonic()
            while (await api.get(f"/v1/jobs/{job['id']}", headers=bearer(alice))).json()[
                "status"
            ] != "done":
                assert time.monotonic() - started < 5
                await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        # Bob cannot join the topics that carry Alice's events or wake her desktop.
        async with client_mod.Client("http://test", token_for(bob), realtime=config,
                                     transport=httpx.ASGITransport(app=app)) as cb:  # fmt: skip
            with pytest.raises(Exception, match="(?i)join|unauthorized|error"):
                async for _ in cb.wakeups(str(alice.tenant_id), str(alice.user_id)):
                    break
            t = alice.tenant_id
            assert not await _joins(cb, f"tenant:{t}:user:{alice.user_id}")  # Alice's events
            assert not await _joins(cb, f"tenant:{t}")  # the tenant's: owners and admins only
            assert await _joins(cb, f"tenant:{t}:user:{bob.user_id}")  # his own
        refused = {j["topic"] for j in rt.joins if not j["accepted"]}
        assert refused == {f"tenant:{t}:agents:{alice.user_id}", f"tenant:{t}:user:{alice.user_id}",
                           f"tenant:{t}"}  # fmt: skip


async def _joins(c: client_mod.Client, topic: str) -> bool:
    """Whether the Realtime double lets this client's user join the private topic."""
    from realtime import RealtimeSubscribeStates

    sb = await c._realtime_client()
    states: asyncio.Queue[Any] = asyncio.Queue()
    channel = sb.channel(topic, {"config": {"private": True}})
    await channel.subscribe(lambda state, _e: states.put_nowait(state))
    try:
        state = await asyncio.wait_for(states.get(), 10)
        return bool(state == RealtimeSubscribeStates.SUBSCRIBED)
    finally:
        await sb.remove_channel(channel)


EXAMPLES = Path(__file__).parents[2] / "examples"


async def _run_example(script: str, *args: str, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLES / script), *args,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return int(proc.returncode or 0), out.decode(), err.decode()


async def test_the_agent_example_runs_alices_todo(
    live_api: str, team: tuple[Member, Member, Member]
) -> None:
    _, alice, _ = team
    env = {"CPA_API_URL": live_api, "CPA_TOKEN": token_for(alice)}
    async with client_mod.Client(live_api, token_for(alice)) as c:
        job = await c.submit(graph={"todos": [OPEN]})
        code, out, err = await _run_example("desktop_agent.py", "--once", env=env)
        assert code == 0, err
        assert "open app 'x'" in out and "open -> done (agree)" in out
        assert (await c.get(job["id"]))["status"] == "done"


@pytest.mark.parametrize("realtime", ["unset", "unreachable"])
async def test_the_follow_example_falls_back_to_the_api_with_a_one_line_reason(
    live_api: str, db: store.Store, team: tuple[Member, Member, Member], realtime: str
) -> None:
    _, alice, _ = team
    env = {"CPA_API_URL": live_api, "CPA_TOKEN": token_for(alice)}
    if realtime == "unreachable":
        env |= {"SUPABASE_URL": f"http://127.0.0.1:{free_port()}", "SUPABASE_PUBLISHABLE_KEY": "k"}
    async with client_mod.Client(live_api, token_for(alice)) as c:
        job = await c.submit(graph={"todos": [{"key": "a", "action": "noop"}]})
    from cpa_scheduler import dispatch

    await dispatch.Dispatcher(db).run_pass(10)
    code, out, err = await _run_example("follow_job_realtime.py", job["id"], env=env)
    assert code == 0, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Realtime unavailable ("), err
    assert ("are not set" in lines[0]) is (realtime == "unset")
    assert out.strip().splitlines()[-1].count('"job.status"') == 1


async def test_without_a_listener_a_long_poll_polls_and_answers_within_a_poll(
    api: httpx.AsyncClient, services: service.Services, team: tuple[Member, Member, Member]
) -> None:
    """As behind Lambda (no LISTEN connection): the claim asks again every 0.2 s for 2 s, then
    every second."""
    from cpa_scheduler import wakeups

    _, alice, _ = team
    services._wakeups = wakeups.Listener(f"postgresql://nobody@127.0.0.1:{free_port()}/x")
    body = {"agent_id": "alice-pc", "actions": None, "wait": 10}
    waiting = asyncio.create_task(api.post("/v1/agents/claim", headers=bearer(alice), json=body))
    await asyncio.sleep(1.5)  # the listener has failed to connect by now: the claim polls
    assert not waiting.done()
    job = (
        await api.post("/v1/jobs", headers=bearer(alice), json={"graph": {"todos": [OPEN]}})
    ).json()
    ready = time.monotonic()
    got = (await waiting).json()
    assert [a["payload"]["job_id"] for a in got] == [job["id"]]
    assert time.monotonic() - ready < 1.4
    assert not services.wakeups.listening


async def test_heartbeats_keep_the_realtime_channel_and_wake_ups_still_arrive(
    app: FastAPI, api: httpx.AsyncClient, db_url: str, team: tuple[Member, Member, Member],
    tmp_path: Path,
) -> None:  # fmt: skip
    _, alice, _ = team
    async with RealtimeDouble(db_url, SECRET, ISSUER) as rt:
        config = client_mod.RealtimeConfig(rt.url, "sb_publishable_test-double-key")
        counting = Counting(app)
        async with client_mod.Client("http://test", token_for(alice), realtime=config,
                                     transport=counting) as c:  # fmt: skip
            task = asyncio.create_task(
                desktop.serve(c, "alice-pc", tmp_path, once=False, heartbeat=0.5)
            )
            await asyncio.sleep(2.0)  # joined, then about three heartbeats
            claims = [p for _, p in counting.paths if p == "/v1/agents/claim"]
            assert 3 <= len(claims) <= 6 and not task.done()
            job = (await api.post("/v1/jobs", headers=bearer(alice),
                                  json={"graph": {"todos": [OPEN]}})).json()  # fmt: skip
            await until(lambda: any(p == "/v1/messages" for _, p in counting.paths[len(claims) :]))
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert [j["accepted"] for j in rt.joins] == [True]  # one join: the channel stayed
    got = (await api.get(f"/v1/jobs/{job['id']}", headers=bearer(alice))).json()
    assert got["todos"][0]["status"] in ("running", "done")


async def test_a_stopping_host_answers_its_waiting_long_polls_at_once(
    api: httpx.AsyncClient, services: service.Services, team: tuple[Member, Member, Member]
) -> None:
    _, alice, _ = team
    body = {"agent_id": "alice-pc", "actions": None, "wait": 20}
    waiting = asyncio.create_task(api.post("/v1/agents/claim", headers=bearer(alice), json=body))
    await asyncio.sleep(1.0)
    assert not waiting.done()
    stopped = time.monotonic()
    services.stopping()  # serve does this before it waits for open requests
    assert (await waiting).json() == []
    assert time.monotonic() - stopped < 1.0


async def test_bob_repeating_alices_idempotency_key_gets_409_not_her_job(
    api: httpx.AsyncClient, team: tuple[Member, Member, Member]
) -> None:
    _, alice, bob = team
    body = {"graph": {"todos": [OPEN]}}
    key = {"Idempotency-Key": "same-key"}
    first = await api.post("/v1/jobs", headers=bearer(alice) | key, json=body)
    again = await api.post("/v1/jobs", headers=bearer(alice) | key, json=body)
    assert first.status_code == 201 and again.json()["id"] == first.json()["id"]
    theirs = await api.post("/v1/jobs", headers=bearer(bob) | key, json=body)
    assert "another user" in is_problem(theirs, 409, "conflict")["detail"]
