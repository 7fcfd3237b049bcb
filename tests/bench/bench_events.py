"""Event latency: a status change committed -> the event in the client's hands.

1. Realtime: the Python client (real ``supabase`` realtime client) follows a job through the
   Phoenix-channels test double (tests/realtime_double.py), which relays the rows the triggers
   write to ``realtime.messages``. Each status change is a real operation in its own transaction
   (todo_claim_v3 with limit 1, then todo_complete_v4), and the next one starts once the client
   has the event (ping-pong: latency without queueing).
2. Lambda mode: the real Mangum handler (functions.api.handler) answering GET /v1/jobs/{id}/events
   in a thread of its own, as a warm Lambda does (one loop, one pool), and a client loop that
   re-asks with Last-Event-ID after each bounded answer. Status changes are committed at random
   moments (0-500 ms apart), so the figure includes waiting for the route's next poll.

Run: .venv/bin/python -m tests.bench.bench_events [--n 1000] [--lambda-n 200]
Everything runs in one process on the shared machine; the figures include its scheduling.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import threading
import time
import uuid
from typing import Any

import uvicorn
from cpa_scheduler import api as api_mod
from cpa_scheduler import auth, service, settings, store
from cpa_scheduler import client as client_mod

from functions import api
from tests.bench.bench_dispatch import pct, server
from tests.events_contract import parse_sse
from tests.realtime_double import RealtimeDouble

SECRET = "bench-secret-bench-secret-bench-secret-0123456789"
ISSUER = "https://bench.supabase.co/auth/v1"


def summary(name: str, ms: list[float]) -> str:
    return (
        f"{name}: n={len(ms)} p50={pct(ms, 50):.1f} ms p90={pct(ms, 90):.1f} ms "
        f"p99={pct(ms, 99):.1f} ms max={max(ms):.1f} ms mean={statistics.fmean(ms):.1f} ms"
    )


async def member(db: store.Store) -> tuple[uuid.UUID, uuid.UUID]:
    t, u = uuid.uuid4(), uuid.uuid4()
    async with db.admin() as s:
        await s.membership_ensure(t, u, tenant_name="bench", email=f"{u}@bench.test")
    return t, u


async def new_job(db: store.Store, tenant_id: uuid.UUID, n: int) -> store.JobRow:
    todos = [{"key": f"k{i}", "action": "noop", "target": "cloud"} for i in range(n)]
    async with db.service() as s:
        return await s.job_create(tenant_id=tenant_id, todos=todos, request="bench", intent="b")


async def step(db: store.Store, tenant_id: uuid.UUID, row: store.TodoRow | None) -> Any:
    """One status change in its own transaction: claim one ToDo, or complete the claimed one."""
    async with db.service() as s:
        if row is None:
            rows = await s.todo_claim(target="cloud", owner="bench", limit=1, tenant_id=tenant_id)
            return rows[0]
        item = {"id": str(row.id), "owner": "bench", "attempt": row.attempts, "result": {}}
        await s.todo_complete([item])
        return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def realtime_figure(db_url: str, n: int) -> list[float]:
    config = settings.Settings(database_url=db_url, supabase_jwt_secret=SECRET,
                               supabase_url=ISSUER.removesuffix("/auth/v1"), rate_limit=100000)  # fmt: skip
    db = store.Store(db_url, max_size=8)
    await db.open()
    verifier = auth.Verifier(hs256_secret=SECRET, issuer=ISSUER)
    app = api_mod.create_app(service.Services(config, db, verifier=verifier))
    port = free_port()
    web = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                        log_level="warning", lifespan="off"))  # fmt: skip
    web_task = asyncio.create_task(web.serve())
    for _ in range(500):
        if web.started:
            break
        await asyncio.sleep(0.01)
    tenant_id, user_id = await member(db)
    job = await new_job(db, tenant_id, n // 2)
    token = auth.mint(SECRET, user_id, issuer=ISSUER)
    latencies: list[float] = []
    async with RealtimeDouble(db_url, SECRET, ISSUER) as rt:
        rtc = client_mod.RealtimeConfig(rt.url, "sb_publishable_bench")
        async with client_mod.Client(f"http://127.0.0.1:{port}", token, realtime=rtc) as c:
            arrived: asyncio.Queue[tuple[dict[str, Any], float]] = asyncio.Queue()

            async def follow() -> None:
                async for event in c.events(str(job.id), tenant_id=str(tenant_id)):
                    arrived.put_nowait((event, time.perf_counter()))

            follower = asyncio.create_task(follow())
            for _ in range(1000):
                if rt.joined:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.5)
            while not arrived.empty():  # the creation events, filled from the API
                arrived.get_nowait()
            row = None
            for _ in range(n):
                row = await step(db, tenant_id, row)
                committed = time.perf_counter()
                while True:  # this change's todo event (a job event may come first)
                    event, at = await asyncio.wait_for(arrived.get(), 10)
                    if event["kind"] == "todo.status":
                        latencies.append((at - committed) * 1000)
                        break
            await asyncio.wait_for(follower, 30)
    web.should_exit = True
    await web_task
    await db.close()
    return latencies


class WarmLambda:
    """The API handler in a thread that keeps one event loop and one pool, as a warm Lambda."""

    def __init__(self, db_url: str) -> None:
        self.db_url = db_url

    def call(self, event: dict[str, Any]) -> dict[str, Any]:
        if not hasattr(self, "_loop"):
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            config = settings.Settings(database_url=self.db_url, supabase_jwt_secret=SECRET,
                                       supabase_url=ISSUER.removesuffix("/auth/v1"))  # fmt: skip
            db = store.Store(self.db_url, max_size=2)
            verifier = auth.Verifier(hs256_secret=SECRET, issuer=ISSUER)
            api.app.state.services = service.Services(config, db, verifier=verifier)

        class Context:
            def get_remaining_time_in_millis(self) -> int:
                return 29_000

        return api.handler(event, Context())  # type: ignore[no-any-return]


def lambda_event(job_id: str, token: str, last: int) -> dict[str, Any]:
    from pathlib import Path

    path = Path(__file__).parents[1] / "fixtures" / "events" / "function_url_get_job_events.json"
    raw = path.read_text().replace("{{job_id}}", job_id).replace("{{token}}", token)
    event: dict[str, Any] = json.loads(raw.replace("{{query}}", ""))
    event["headers"]["last-event-id"] = str(last)
    return event


async def lambda_figure(db_url: str, n: int) -> tuple[list[float], int]:
    db = store.Store(db_url, max_size=4)
    await db.open()
    tenant_id, user_id = await member(db)
    job = await new_job(db, tenant_id, n // 2 + 1)
    token = auth.mint(SECRET, user_id, issuer=ISSUER)
    async with db.service() as s:
        last = max(e["id"] for e in await s.event_list(job.id, 0, 10_000))
    committed: dict[str, float] = {}  # "<todo_id>:<status>" -> commit time
    latencies: list[float] = []
    calls = 0
    stop = threading.Event()
    warm = WarmLambda(db_url)
    seen: list[tuple[dict[str, Any], float]] = []

    def client_loop() -> None:
        nonlocal last, calls
        while not stop.is_set():
            answer = warm.call(lambda_event(str(job.id), token, last))
            at = time.perf_counter()
            calls += 1
            events, _ = parse_sse(answer.get("body") or "")
            for e in events:
                seen.append((e, at))
                last = e["id"]

    worker = threading.Thread(target=client_loop, daemon=True)
    worker.start()
    row = None
    for _ in range(n):
        await asyncio.sleep(random.uniform(0, 0.5))
        row_before = row
        row = await step(db, tenant_id, row)
        todo = row if row is not None else row_before
        status = "running" if row is not None else "done"
        committed[f"{todo['id']}:{status}"] = time.perf_counter()
    await asyncio.sleep(1.0)
    stop.set()
    await asyncio.to_thread(worker.join, 30)
    for e, at in seen:
        key = f"{e['todo_id']}:{e['status']}"
        if e["kind"] == "todo.status" and key in committed:
            latencies.append((at - committed[key]) * 1000)
    await db.close()
    return latencies, calls


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--lambda-n", type=int, default=200)
    args = ap.parse_args()
    srv, stop = server()
    name = srv.create_db(supabase=True)
    try:
        url = srv.url(name)
        rt = await realtime_figure(url, args.n)
        print(summary("Realtime (test double), commit -> client", rt), flush=True)
        lam, calls = await lambda_figure(url, args.lambda_n)
        print(summary("Lambda mode (Mangum, bounded SSE), commit -> client", lam), flush=True)
        print(f"  handler invocations: {calls}", flush=True)
    finally:
        srv.drop_db(name)
        stop()


if __name__ == "__main__":
    asyncio.run(main())
