"""Desktop agents (issue 21): ready → assign latency, idle cost per agent, events flush A/B.

Usage: python -m tests.bench.bench_desktop [--todos 200] [--idle-calls 2000] [--repeats 3]

1. Latency in local mode: ``cpa-scheduler serve`` on 127.0.0.1 (its LISTEN wake-ups on), one
   agent long-polling ``POST /v1/agents/claim`` (``wait`` 20); a user creates ``--todos`` jobs of
   one desktop ToDo each, 20–50 ms apart. Latency = the agent holding the ``assign`` minus the
   creating transaction's commit (the ToDo is ready from then). The same through the Realtime
   test double (tests/realtime_double.py): the agent claims (``wait`` 0) on each ``todo_ready``.
2. Idle cost: ``--idle-calls`` empty claims, each its own transaction as ``authenticated``, of
   the claim before this issue (an upsert of ``last_seen_at`` on every call, then
   ``todo_claim_v2``: recreated here from its migration's text) and of ``cpa.agent_claim_v2``
   now; the database time per call from ``pg_stat_user_functions`` (``track_functions = all``),
   WAL bytes per call from ``pg_current_wal_lsn()``. Per idle agent per hour: before 3,600
   claims (one a second); after 180 (long-poll, 20 s), 60 (Realtime heartbeat), or 5,040 behind
   Lambda (each 20 s long-poll claims again every 0.2 s for 2 s, then every second: 28).
3. The events flush with per-user topics against the flush before (recreated from its
   migration's text, with the ToDo trigger before the wake-ups and no agent audit trigger):
   100 jobs × 50-ToDo chains owned by a user, drained by the dispatcher; ToDos/s, interleaved.

Every system gets a fresh database on a durable embedded PostgreSQL under ``.bench/`` (or
BENCH_DATABASE_URL, a superuser URL), as tests/bench/bench_dispatch.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psycopg
from cpa_scheduler import auth, store
from cpa_scheduler import client as client_mod

from tests.bench import bench_dispatch as b
from tests.realtime_double import RealtimeDouble

ROOT = Path(__file__).resolve().parents[2]
MIGRATIONS = ROOT / "supabase" / "migrations"
SECRET = "bench-secret-with-enough-entropy-for-hs256-0123456789"
ISSUER = "https://bench.supabase.co/auth/v1"
OPEN = {"key": "open", "action": "desktop.open_app", "target": "desktop", "params": {"app": "x"}}


def pct(values: list[float], p: float) -> float:
    return b.pct(values, p)


async def _user(db: store.Store) -> tuple[uuid.UUID, uuid.UUID, dict[str, Any]]:
    t, u = uuid.uuid4(), uuid.uuid4()
    async with db.admin() as s:
        await s.membership_ensure(t, u, tenant_name="bench", role="member")
    return t, u, {"sub": str(u), "role": "authenticated", "aud": "authenticated"}


# --- 1. latency ------------------------------------------------------------------------------


async def latency(srv: b.Server, todos: int, *, realtime: bool) -> list[float]:
    name = srv.create_db(supabase=True)
    url = srv.url(name)
    db = store.Store(url, max_size=6)
    try:
        t, u, claims = await _user(db)
        # The API in its own process, as `cpa-scheduler serve` runs it (with its dispatcher).
        port = b_free_port()
        env = {**os.environ, "DATABASE_URL": url, "SUPABASE_JWT_SECRET": SECRET,
               "SUPABASE_URL": ISSUER.removesuffix("/auth/v1"), "CPA_LOG_LEVEL": "WARNING"}  # fmt: skip
        proc = subprocess.Popen(
            [sys.executable, "-m", "cpa_scheduler.cli", "serve", "--port", str(port)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        async with httpx.AsyncClient() as probe:
            for _ in range(300):
                with contextlib.suppress(httpx.HTTPError):
                    if (await probe.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                        break
                await asyncio.sleep(0.1)
        token = auth.mint(SECRET, u, issuer=ISSUER)
        got: dict[str, float] = {}
        double = RealtimeDouble(url, SECRET, ISSUER) if realtime else None
        if double is not None:
            await double.__aenter__()
        rt = client_mod.RealtimeConfig(double.url, "bench-key") if double is not None else None
        async with client_mod.Client(f"http://127.0.0.1:{port}", token, realtime=rt) as c:

            async def take(wait: float) -> None:
                for a in await c.claim("pc", None, 50, wait=wait):
                    got[a.payload.job_id] = time.monotonic()

            async def agent() -> None:
                if rt is None:
                    while True:
                        await take(20)
                async for item in c.wakeups(str(t), str(u)):
                    if "todo_id" in item:
                        await take(0)

            joined = asyncio.Event()
            if double is not None:

                async def watch_join() -> None:  # fmt: skip
                    while not double.joins:  # noqa: ASYNC110 - a bench's plain wait
                        await asyncio.sleep(0.01)
                    joined.set()

                watcher = asyncio.create_task(watch_join())
                watcher.add_done_callback(lambda _t: None)
            else:
                joined.set()
            runner = asyncio.create_task(agent())
            await joined.wait()
            await asyncio.sleep(0.5)
            trips = []
            for _ in range(20):  # a peer figure: an empty claim's round trip, same moment
                t0 = time.monotonic()
                await c.claim("peer", None, 5)
                trips.append((time.monotonic() - t0) * 1000)
            print(f"  empty claim round trip p50 {statistics.median(trips):.1f} ms", flush=True)
            ready: dict[str, float] = {}
            for _ in range(todos):
                async with db.user(claims) as s:
                    job = await s.job_create(tenant_id=t, todos=[OPEN], request="bench")
                ready[str(job.id)] = time.monotonic()  # committed: the ToDo is ready
                await asyncio.sleep(random.uniform(0.02, 0.05))
            end = time.monotonic() + 10
            while len(got) < todos and time.monotonic() < end:  # noqa: ASYNC110 - a bench's plain wait
                await asyncio.sleep(0.05)
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        if double is not None:
            await double.__aexit__(None, None, None)
        proc.terminate()
        try:
            proc.wait(30)  # in-flight long-polls end within their 20 s
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        missing = len(ready) - len(got)
        if missing:
            print(f"  {missing} ToDos not assigned within 10 s", flush=True)
        return [(got[j] - ready[j]) * 1000 for j in ready if j in got]
    finally:
        await db.close()
        srv.drop_db(name)


def b_free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- 2. idle cost ----------------------------------------------------------------------------


def _function_text(migration: str, signature: str) -> str:
    """A function's definition from a migration file, as ``create or replace``."""
    text = (MIGRATIONS / migration).read_text()
    start = text.index(f"create function {signature}")
    end = text.index("$$;", text.index("$$", start) + 2) + 3
    return "create or replace " + text[start + len("create ") : end]


def _before_claim_sql() -> str:
    """The claim before this issue, under another name (its body from its migration)."""
    text = _function_text("20261127100100_agent_owner.sql", "cpa.agent_claim_v2(")
    return text.replace("cpa.agent_claim_v2(", "cpa.bench_agent_claim_before(", 1)


async def idle_cost(srv: b.Server, calls: int) -> dict[str, float]:
    name = srv.create_db(supabase=True)
    url = srv.url(name)
    admin = b.conninfo_to_dict(srv.admin_url)["user"]
    with psycopg.connect(srv.url(name, user=str(admin)), autocommit=True) as c:
        c.execute(f"alter database \"{name}\" set track_functions = 'all'")
    with psycopg.connect(url, autocommit=True) as c:
        c.execute(_before_claim_sql())
        c.execute("grant execute on function cpa.bench_agent_claim_before"
                  "(uuid, text, text[], integer, double precision) to authenticated")  # fmt: skip
    db = store.Store(url, max_size=2)
    out: dict[str, float] = {}
    try:
        t, _, claims = await _user(db)
        queries = {
            "before": "select * from cpa.bench_agent_claim_before(%s, 'pc-b', %s, 5, 300)",
            "after": "select * from cpa.agent_claim_v2(%s, 'pc-a', %s, 5, 300)",
        }
        functions = {"before": "bench_agent_claim_before", "after": "agent_claim_v2"}
        for variant, query in queries.items():
            stats0, lsn0 = _stats(url, functions[variant])
            t0 = time.perf_counter()
            for _ in range(calls):
                async with db.user(claims) as s:
                    await s.conn.execute(query, (t, ["desktop.open_app"]))
            wall = (time.perf_counter() - t0) / calls * 1000
            stats1, lsn1 = _stats(url, functions[variant])
            out[f"{variant} db ms/call"] = (stats1 - stats0) / calls
            out[f"{variant} round trip ms/call"] = wall
            out[f"{variant} WAL bytes/call"] = (lsn1 - lsn0) / calls
    finally:
        await db.close()
        srv.drop_db(name)
    return out


def _stats(url: str, function: str) -> tuple[float, int]:
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("select pg_stat_clear_snapshot()")
        row = c.execute(
            "select coalesce(sum(total_time), 0) from pg_stat_user_functions where funcname = %s",
            (function,),
        ).fetchone()
        lsn = c.execute("select pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()
    assert row is not None and lsn is not None
    return float(row[0]), int(lsn[0])


# --- 3. the events flush, before and after ----------------------------------------------------


def _restore_before(url: str) -> None:
    flush = _function_text("20261128000700_events_flush_locks.sql", "private.job_events_flush_v4(")
    todos = _function_text("20261128000800_submit_events_direct.sql", "private.todos_events_v2(")
    with psycopg.connect(url, autocommit=True) as c:
        c.execute(flush)
        c.execute(todos)
        c.execute("drop trigger todos_agent_audit on public.todos")


async def flush_drain(srv: b.Server, *, before: bool, jobs: int, length: int) -> tuple[float, int]:
    name = srv.create_db(supabase=True)
    url = srv.url(name)
    admin = b.conninfo_to_dict(srv.admin_url)["user"]
    with psycopg.connect(srv.url(name, user=str(admin)), autocommit=True) as c:
        c.execute(f"alter database \"{name}\" set track_functions = 'all'")
    if before:
        _restore_before(url)
    db = store.Store(url, max_size=4)
    try:
        t, _, claims = await _user(db)
        chain = [{"key": f"c{i}", "action": "noop", "depends_on": [f"c{i - 1}"] if i else []}
                 for i in range(length)]  # fmt: skip
        for _ in range(jobs):
            async with db.user(claims) as s:
                await s.job_create(tenant_id=t, todos=chain, request="bench")
        await b._vacuum(url)
        elapsed, summary = await b.drain(db)
        assert summary.done == jobs * length, summary
        async with db.admin() as s:
            cur = await s.conn.execute("select count(*) as n from realtime.messages")
            sends = int((await cur.fetchone() or {"n": 0})["n"])
        flush_ms, _ = _stats(url, "job_events_flush_v4")
        todos_ms, _ = _stats(url, "todos_events_v2")
        print(
            f"  database ms: flush {flush_ms:,.0f}, ToDo status trigger {todos_ms:,.0f}", flush=True
        )
        return jobs * length / elapsed, sends
    finally:
        await db.close()
        srv.drop_db(name)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--todos", type=int, default=200)
    ap.add_argument("--idle-calls", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=100)
    ap.add_argument("--length", type=int, default=50)
    ap.add_argument("--skip", default="", help="comma list of latency,idle,flush to skip")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    srv, stop = b.server()
    try:
        if "latency" not in skip:
            for realtime in (False, True):
                lat = await latency(srv, args.todos, realtime=realtime)
                label = "Realtime double" if realtime else "long-poll"
                print(f"latency {label}: n={len(lat)} p50 {pct(lat, 50):.1f} ms, "
                      f"p99 {pct(lat, 99):.1f} ms, max {max(lat):.1f} ms", flush=True)  # fmt: skip
        if "idle" not in skip:
            cost = await idle_cost(srv, args.idle_calls)
            print(json.dumps(cost, indent=1), flush=True)
            per_hour = {
                "before (1 claim/s)": 3600 * cost["before db ms/call"],
                "after, long-poll (180 claims)": 180 * cost["after db ms/call"],
                "after, Realtime (60 claims)": 60 * cost["after db ms/call"],
                "after, Lambda long-poll (5,040 claims)": 5040 * cost["after db ms/call"],
            }
            for k, v in per_hour.items():
                print(f"db ms per idle agent per hour, {k}: {v:,.0f}", flush=True)
        if "flush" not in skip:
            runs: dict[str, list[float]] = {"before": [], "after": []}
            for rep in range(args.repeats):
                order = ("before", "after") if rep % 2 == 0 else ("after", "before")
                for variant in order:
                    rate, sends = await flush_drain(srv, before=variant == "before",
                                                    jobs=args.jobs, length=args.length)  # fmt: skip
                    runs[variant].append(rate)
                    print(f"flush {variant}: {rate:,.0f} ToDos/s, {sends} broadcasts", flush=True)
            med = {k: statistics.median(v) for k, v in runs.items()}
            print(f"flush medians: before {med['before']:,.0f}, after {med['after']:,.0f}, "
                  f"ratio {med['after'] / med['before']:.2f}")  # fmt: skip
    finally:
        stop()


if __name__ == "__main__":
    asyncio.run(main())
