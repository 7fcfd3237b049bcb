"""Hardening figures (issue 10): fairness under load, recovery after a connection loss, and the
time to a 503 while the database is down.

Run with ``python -m tests.bench.bench_faults`` (same server choice as bench_dispatch: a
durable embedded PostgreSQL under ``.bench/`` unless BENCH_DATABASE_URL is set). The database
sits behind the TCP proxy of tests/proxy.py, which can drop every connection or stop answering.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from typing import Any

import httpx
from cpa_scheduler import auth, dispatch, service, settings, store

from tests import proxy as proxy_mod
from tests.bench.bench_dispatch import Server, server

SECRET = "bench-secret-with-enough-entropy-for-hs256-0123456789"


async def _member(db: store.Store) -> tuple[uuid.UUID, uuid.UUID]:
    t, u = uuid.uuid4(), uuid.uuid4()
    async with db.admin() as s:
        await s.membership_ensure(t, u, tenant_name=f"bench-{t.hex[:6]}")
    return t, u


async def _running(db: store.Store, tenant_id: uuid.UUID) -> int:
    async with db.service() as s:
        cur = await s.conn.execute(
            "select count(*) as n from public.todos where tenant_id = %s and status = 'running'",
            (tenant_id,),
        )
        row = await cur.fetchone()
    return int(row["n"]) if row else 0


async def fairness(srv: Server, cap: int | None, seconds: float) -> tuple[float, int]:
    """B's one-ToDo job while A holds 400 long ToDos: its start delay (s), and A's running."""
    name = srv.create_db(supabase=True)
    url = srv.url(name)
    db = store.Store(url, max_size=8)
    try:
        a, _ = await _member(db)
        b, _ = await _member(db)
        todo = {"action": "noop", "target": "cloud", "params": {"duration_ms": int(seconds * 1000)}}
        async with db.service() as s:
            await s.job_create(tenant_id=a, todos=[{"key": f"a{i}", **todo} for i in range(400)])
        d = dispatch.Dispatcher(db, tenant_cap=cap)  # defaults: 128 concurrent, 2 lanes
        stop = asyncio.Event()
        worker = asyncio.create_task(d.run_forever(url, stop=stop))
        limit = cap or d.concurrency
        for _ in range(400):
            if await _running(db, a) >= limit:
                break
            await asyncio.sleep(0.05)
        held = await _running(db, a)
        async with db.service() as s:
            job = await s.job_create(
                tenant_id=b, todos=[{"key": "b", "action": "noop", "target": "cloud"}]
            )
        started = None
        for _ in range(int((seconds + 10) / 0.02)):
            async with db.service() as s:
                [row] = await s.job_todos(job.id)
            if row["started_at"] is not None:
                started = row["started_at"]
                break
            await asyncio.sleep(0.02)
        stop.set()
        await worker
        assert started is not None
        return (started - job.created_at).total_seconds(), held
    finally:
        await db.close()
        srv.drop_db(name)


async def recovery(srv: Server, cuts: int) -> list[float]:
    """Seconds from dropping every connection (pool and LISTEN) to the dispatcher's next
    successful round trip, during a running 200-ToDo job."""
    name = srv.create_db(supabase=True)
    url = srv.url(name)
    proxy, purl = await proxy_mod.start_for(url)
    db = store.Store(purl, max_size=8)
    out = []
    try:
        t, _ = await _member(db)
        todos = [
            {"key": f"t{i}", "action": "noop", "target": "cloud", "params": {"duration_ms": 200}}
            for i in range(200 * cuts)
        ]
        async with db.service() as s:
            for i in range(0, len(todos), 1000):
                await s.job_create(tenant_id=t, todos=todos[i : i + 1000])
        d = dispatch.Dispatcher(db, concurrency=32)
        stop = asyncio.Event()
        worker = asyncio.create_task(d.run_forever(purl, stop=stop))
        for _ in range(cuts):
            await asyncio.sleep(0.5)
            cut = time.monotonic()
            proxy.cut()
            for _ in range(6000):  # until the loop has seen the fault and answers again
                last = d.health.last_ok
                if last is not None and last > cut:
                    break
                await asyncio.sleep(0.005)
            out.append((d.health.last_ok or cut) - cut)
        stop.set()
        await worker
        return out
    finally:
        await db.close()
        await proxy.stop()
        srv.drop_db(name)


async def time_to_503(srv: Server, tries: int) -> list[tuple[float, int, float, int]]:
    """(seconds, status) of GET /v1/jobs and of GET /readyz while the database is unreachable
    (connections dropped, new ones never answered)."""
    name = srv.create_db(supabase=True)
    url = srv.url(name)
    proxy, purl = await proxy_mod.start_for(url)
    db = store.Store(purl, max_size=4, timeout=2.0)
    out = []
    try:
        t, u = await _member(db)
        config = settings.Settings(
            database_url=purl, supabase_jwt_secret=SECRET, supabase_url="https://bench.supabase.co"
        )
        verifier = auth.Verifier(hs256_secret=SECRET, issuer=config.issuer)
        token = auth.mint(SECRET, u, issuer=config.issuer or "", tenant_id=t)
        from cpa_scheduler import api

        app = api.create_app(service.Services(config, db, verifier=verifier))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            headers = {"Authorization": f"Bearer {token}"}
            assert (await client.get("/v1/jobs", headers=headers)).status_code == 200
            proxy.down()
            for _ in range(tries):
                t0 = time.monotonic()
                r = await client.get("/v1/jobs", headers=headers)
                t1 = time.monotonic()
                ready = await client.get("/readyz")
                t2 = time.monotonic()
                out.append((t1 - t0, r.status_code, t2 - t1, ready.status_code))
            proxy.up()
        return out
    finally:
        await db.close()
        await proxy.stop()
        srv.drop_db(name)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10.0, help="duration of A's ToDos")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    srv, stop = server()
    try:
        for label, cap in (("cap 64 (default)", 64), ("no cap", None)):
            runs = [await fairness(srv, cap, args.seconds) for _ in range(args.repeats)]
            delays = [round(r[0], 3) for r in runs]
            print(f"fairness, {label}: B start delay s {delays} (median "
                  f"{statistics.median(delays):.3f}); A running {[r[1] for r in runs]}",
                  flush=True)  # fmt: skip
        rec = await recovery(srv, 5)
        print(f"recovery after a connection cut, s: {[round(r, 3) for r in rec]} "
              f"(median {statistics.median(rec):.3f}, max {max(rec):.3f})", flush=True)  # fmt: skip
        down = await time_to_503(srv, 5)
        shown: list[Any] = [(round(a, 3), s, round(b, 3), r) for a, s, b, r in down]
        print(f"database down: (GET /v1/jobs s, status, GET /readyz s, status) {shown}", flush=True)
    finally:
        stop()


if __name__ == "__main__":
    asyncio.run(main())
