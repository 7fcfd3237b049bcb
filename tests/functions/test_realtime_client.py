"""The Python client over Realtime: the real ``supabase`` realtime client against the test double.

The double (tests/realtime_double.py) relays what the database broadcasts and authorizes joins
with the migrations' RLS policy; the API the client fills gaps from is the real app.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from cpa_scheduler import client as client_mod
from cpa_scheduler import dispatch, errors, store

from tests import events_contract
from tests.conftest import Member, MemberFactory
from tests.functions.conftest import ISSUER, SECRET, token_for
from tests.realtime_double import RealtimeDouble

KEY = "sb_publishable_test-double-key"
EXAMPLE = Path(__file__).parents[2] / "examples" / "follow_job_realtime.py"
# realtime 2.34 logs a dropped socket's close code through a deprecated websockets attribute.
pytestmark = pytest.mark.filterwarnings(
    "ignore:ConnectionClosed.code is deprecated:DeprecationWarning",
    "ignore:ConnectionClosed.reason is deprecated:DeprecationWarning",
)


@pytest.fixture
async def realtime(db_url: str) -> AsyncIterator[RealtimeDouble]:
    async with RealtimeDouble(db_url, SECRET, ISSUER) as rt:
        yield rt


def chain(n: int, ms: int) -> dict[str, Any]:
    return {"todos": [
        {"key": f"s{i}", "action": "noop", "params": {"duration_ms": ms},
         "depends_on": [f"s{i - 1}"] if i else []}
        for i in range(n)
    ]}  # fmt: skip


async def stored_ids(db: store.Store, m: Member, job_id: str) -> list[int]:
    async with db.user(m.claims) as s:
        return [e["id"] for e in await s.event_list(job_id, 0, 1000)]


async def until(check: Any, limit: float = 10.0) -> None:
    end = time.monotonic() + limit
    while not check():
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.01)


async def collect(c: client_mod.Client, job_id: str, out: list[dict[str, Any]]) -> None:
    async for event in c.events(job_id):
        out.append(events_contract.validate(event))


async def test_join_with_the_access_token_and_receive_the_jobs_events_in_order(
    live_api: str, db: store.Store, realtime: RealtimeDouble, member_factory: MemberFactory
) -> None:
    a, b = await member_factory("A"), await member_factory("B")
    token = token_for(a)
    config = client_mod.RealtimeConfig(realtime.url, KEY)
    async with client_mod.Client(live_api, token, realtime=config) as c:
        job = await c.submit(graph=chain(4, 20))
        async with client_mod.Client(live_api, token_for(b)) as cb:
            other = await cb.submit(graph=chain(3, 20))  # another tenant's progress, same time
        got: list[dict[str, Any]] = []
        follower = asyncio.create_task(collect(c, job["id"], got))
        await until(lambda: realtime.joined == 1)
        await dispatch.Dispatcher(db).run_pass(20)
        await asyncio.wait_for(follower, 10)

    assert realtime.joins[0] == {
        "topic": f"tenant:{a.tenant_id}:user:{a.user_id}", "token": token, "accepted": True
    }  # fmt: skip
    assert [e["id"] for e in got] == await stored_ids(db, a, job["id"])
    assert {e["job_id"] for e in got} == {job["id"]} and other["id"] != job["id"]
    assert (got[-1]["kind"], got[-1]["status"]) == ("job.status", "done")
    assert realtime.relayed >= 4  # the running and done changes came over the socket


async def test_another_tenants_topic_is_refused(
    live_api: str, realtime: RealtimeDouble, member_factory: MemberFactory
) -> None:
    from realtime import RealtimeSubscribeStates

    from supabase import AsyncClientOptions, acreate_client

    a, b = await member_factory("A"), await member_factory("B")
    sb = await acreate_client(realtime.url, KEY, AsyncClientOptions(persist_session=False))
    await sb.realtime.set_auth(token_for(a))
    states: list[Any] = []
    channel = sb.channel(f"tenant:{b.tenant_id}", {"config": {"private": True}})  # type: ignore[typeddict-item]
    await channel.subscribe(lambda state, _err: states.append(state))
    await sb.remove_all_channels()
    assert states[0] == RealtimeSubscribeStates.CHANNEL_ERROR
    assert realtime.joins[-1]["accepted"] is False


async def test_a_dropped_socket_resumes_without_a_gap(
    live_api: str, db: store.Store, realtime: RealtimeDouble, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    config = client_mod.RealtimeConfig(realtime.url, KEY, reconnect_backoff=0.2)
    async with client_mod.Client(live_api, token_for(m), realtime=config) as c:
        job = await c.submit(graph=chain(16, 100))
        got: list[dict[str, Any]] = []
        follower = asyncio.create_task(collect(c, job["id"], got))
        await until(lambda: realtime.joined == 1)
        runner = asyncio.create_task(dispatch.Dispatcher(db).run_pass(30))
        await until(lambda: len(got) >= 6)
        relayed_before = realtime.relayed
        await realtime.drop(refuse_for=0.5)  # events of ~5 ToDos happen while it is down
        # The client reconnects (refused twice: backoff 0.2 s, 0.4 s) and rejoins.
        await until(lambda: sum(j["accepted"] for j in realtime.joins) == 2)
        await asyncio.wait_for(follower, 15)
        await runner

    ids = [e["id"] for e in got]
    assert ids == await stored_ids(db, m, job["id"])  # nothing lost, nothing repeated
    assert sum(j["accepted"] for j in realtime.joins) == 2
    assert realtime.relayed > relayed_before  # and it went on over the socket after the gap


async def test_the_token_is_refreshed_before_it_expires(
    live_api: str, db: store.Store, realtime: RealtimeDouble, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    fresh: list[str] = []

    async def provider() -> str:
        fresh.append(token_for(m, ttl=60))
        return fresh[-1]

    short = token_for(m, ttl=3)  # refreshed halfway through its life, after the join
    expires = client_mod.token_expiry(short)
    assert expires is not None
    config = client_mod.RealtimeConfig(realtime.url, KEY)
    async with client_mod.Client(live_api, short, realtime=config, token_provider=provider) as c:
        job = await c.submit(graph=chain(8, 450))  # about 4 s, outliving the first token
        got: list[dict[str, Any]] = []
        follower = asyncio.create_task(collect(c, job["id"], got))
        await until(lambda: realtime.joined == 1)
        await dispatch.Dispatcher(db).run_pass(30)
        await asyncio.wait_for(follower, 15)
        assert c.token == fresh[0]

    assert time.time() > expires[1]  # the job outlived the first token
    assert realtime.token_updates == fresh[:1] and realtime.closed_for_expiry == []
    assert [e["id"] for e in got] == await stored_ids(db, m, job["id"])


async def test_watch_follows_over_realtime_when_configured(
    live_api: str, db: store.Store, realtime: RealtimeDouble, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    token = token_for(m)
    async with client_mod.Client(live_api, token) as c:
        job = await c.submit(graph=chain(3, 50))
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "CPA_API_URL": live_api,
        "CPA_TOKEN": token,
        "SUPABASE_URL": realtime.url,
        "SUPABASE_PUBLISHABLE_KEY": KEY,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cpa_scheduler.cli", "watch", job["id"], env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    await until(lambda: realtime.joined == 1, limit=30)
    await dispatch.Dispatcher(db).run_pass(20)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    assert f"job {job['id']} done" in out.decode()
    assert realtime.joins[0]["accepted"] and realtime.relayed >= 1


async def test_the_supabase_py_example_runs(
    live_api: str, db: store.Store, realtime: RealtimeDouble, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    token = token_for(m)
    async with client_mod.Client(live_api, token) as c:
        job = await c.submit(graph=chain(3, 50))
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "CPA_API_URL": live_api,
        "CPA_TOKEN": token,
        "SUPABASE_URL": realtime.url,
        "SUPABASE_PUBLISHABLE_KEY": KEY,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLE), job["id"], env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    await until(lambda: realtime.joined == 1, limit=30)
    await dispatch.Dispatcher(db).run_pass(20)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    printed = [events_contract.validate(json.loads(line)) for line in out.decode().splitlines()]
    assert [e["id"] for e in printed] == await stored_ids(db, m, job["id"])
    assert realtime.relayed >= 1


@respx.mock
async def test_supabase_refresher_rotates_the_refresh_token() -> None:
    url = "https://test-project.supabase.co"
    calls: list[dict[str, Any]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        calls.append({"apikey": request.headers["apikey"], **body})
        n = len(calls)
        # GoTrue's answer to grant_type=refresh_token (fields as the Auth API returns them).
        return httpx.Response(200, json={
            "access_token": f"access-{n}", "token_type": "bearer", "expires_in": 3600,
            "expires_at": int(time.time()) + 3600, "refresh_token": f"refresh-{n}",
            "user": {"id": "00000000-0000-4000-8000-000000000001", "aud": "authenticated",
                     "role": "authenticated"},
        })  # fmt: skip

    route = respx.post(f"{url}/auth/v1/token", params={"grant_type": "refresh_token"})
    route.side_effect = answer
    refresh = client_mod.supabase_refresher(url, KEY, "refresh-0")
    assert await refresh() == "access-1" and await refresh() == "access-2"
    assert calls == [
        {"apikey": KEY, "refresh_token": "refresh-0"},
        {"apikey": KEY, "refresh_token": "refresh-1"},
    ]
    route.side_effect = lambda request: httpx.Response(
        400, json={"code": 400, "error_code": "refresh_token_not_found",
                   "msg": "Invalid Refresh Token: Refresh Token Not Found"},
    )  # fmt: skip
    with pytest.raises(errors.AuthError, match="sign in again"):
        await refresh()
