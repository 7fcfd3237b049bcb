"""API benchmark: POST /v1/jobs (5-ToDo graph) against `serve` and a bare FastAPI route doing
one insert into the same Postgres. Single-client latency, then open-loop load from a separate
process at fixed arrival rates (tests/bench/openloop.py), and the highest rate whose p99 stays
under 100 ms. Run: make bench."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any

import httpx
import psycopg
from cpa_scheduler import auth

from tests.bench.bench_dispatch import pct, server

SECRET = "bench-secret-bench-secret-bench-secret-0123456789"
ISSUER = "https://bench.supabase.co/auth/v1"
# Cloud ToDos: serve's dispatcher also runs them during the measurement (5 per job).
GRAPH = {
    "todos": [
        {"key": f"k{i}", "action": "noop", "depends_on": [f"k{i - 1}"] if i else []}
        for i in range(5)
    ]
}
# Desktop ToDos wait for an agent, so this variant measures the API alone.
DESKTOP = {
    "todos": [
        {
            "key": f"d{i}",
            "action": "desktop.open_app",
            "params": {"app": f"App{i}"},
            "depends_on": [f"d{i - 1}"] if i else [],
        }
        for i in range(5)
    ]
}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(cmd: list[str], env: dict[str, str], base: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            if (
                httpx.get(
                    f"{base}/healthz" if any("cpa_scheduler" in c for c in cmd) else f"{base}/docs",
                    timeout=1,
                ).status_code
                == 200
            ):
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{cmd} did not start")


def openloop(
    url: str,
    body: Any,
    headers: dict[str, str],
    rate: float,
    seconds: float,
    *,
    allow_errors: bool = False,
) -> dict[str, float]:
    """One open-loop run at ``rate`` req/s in a separate load process.

    ``allow_errors``: past its capacity a server may refuse or time out (503 when its pool is
    exhausted); the search for the sustainable rate counts that as a miss, not as a crash."""  # fmt: skip
    cmd = [sys.executable, "-m", "tests.bench.openloop", url, "--rate", str(rate),
           "--seconds", str(seconds), "--body", json.dumps(body)]  # fmt: skip
    for name, value in headers.items():
        cmd += ["--header", f"{name}: {value}"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=seconds * 20)
    result: dict[str, float] = json.loads(done.stdout)
    assert allow_errors or result["errors"] == 0, result
    return result


async def single_client(url: str, body: Any, headers: dict[str, str], n: int) -> list[float]:
    """Milliseconds per request, one request at a time (the desktop's usual case)."""
    lat: list[float] = []
    async with httpx.AsyncClient(timeout=30) as c:
        for i in range(n + 20):
            t0 = time.perf_counter()
            r = await c.post(url, json=body, headers=headers)
            assert r.status_code in (200, 201), r.text
            if i >= 20:  # warm-up
                lat.append((time.perf_counter() - t0) * 1000)
    return lat


async def steady(
    targets: dict[str, tuple[str, Any, dict[str, str]]], n: int, urls: tuple[str, ...]
) -> None:
    """Bring the databases to a steady state before measuring: ``n`` requests to each server,
    then ANALYZE. A fresh database has no statistics until autovacuum's first pass (up to a
    minute), and each pooled connection keeps the generic plans its PL/pgSQL functions made
    while the tables were empty: sequential scans of todos and todo_edges, so a POST got slower
    with every job (2 ms more after 2,400 jobs). ANALYZE replans them, as autovacuum does on a
    database that has been running."""
    async with httpx.AsyncClient(timeout=30) as c:
        for target, body, headers in targets.values():
            for _ in range(n):
                r = await c.post(target, json=body, headers=headers)
                assert r.status_code in (200, 201), r.text
    for db_url in urls:
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute("analyze")


RATES = (25, 50, 100)
SEARCH = (25, 50, 75, 100, 150, 200, 300, 400)


def sustainable(url: str, body: Any, headers: dict[str, str], seconds: float) -> float:
    """The highest rate of SEARCH whose p99 stays under 100 ms (0 if none)."""
    best = 0.0
    for rate in SEARCH:
        result = openloop(url, body, headers, rate, seconds, allow_errors=True)
        if result["p99"] >= 100 or result["errors"]:
            break
        best = rate
    return best


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=5.0, help="per open-loop rate")
    ap.add_argument("--single", type=int, default=200, help="single-client requests")
    ap.add_argument(
        "--steady",
        type=int,
        default=1000,
        help="jobs each server creates before the measurement, then ANALYZE (0: none)",
    )
    args = ap.parse_args()
    srv, stop = server()
    name = srv.create_db(supabase=True)
    url = srv.url(name)
    # The API alone gets a database of its own: on the shared one, serve's dispatcher would run
    # the ToDos of its jobs too, on the same 2 cores, while its latency is measured.
    api_name = srv.create_db(supabase=True)
    api_url = srv.url(api_name)
    tenant, user = uuid.uuid4(), uuid.uuid4()
    for db_url in (url, api_url):
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute("insert into auth.users (id) values (%s)", (user,))
            conn.execute("insert into public.tenants (id, name) values (%s, 'bench')", (tenant,))
            conn.execute(
                "insert into public.memberships (tenant_id, user_id) values (%s, %s)",
                (tenant, user),
            )
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("create table public.bare (id bigserial primary key, body jsonb)")
    token = auth.mint(SECRET, user, issuer=ISSUER)
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "SUPABASE_JWT_SECRET": SECRET,
        "SUPABASE_URL": ISSUER.removesuffix("/auth/v1"),
        "CPA_RATE_LIMIT": "1000000000",
    }
    ours_port, bare_port, api_port = free_port(), free_port(), free_port()
    ours = start(
        [sys.executable, "-m", "cpa_scheduler.cli", "serve", "--port", str(ours_port)],
        env,
        f"http://127.0.0.1:{ours_port}",
    )
    bare = start(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "tests.bench.bare_app:app",
            "--port",
            str(bare_port),
            "--log-level",
            "warning",
        ],
        env,
        f"http://127.0.0.1:{bare_port}",
    )
    # The API alone, as the Lambda function runs it: no dispatcher sharing its event loop.
    api_only = start(
        [sys.executable, "-m", "uvicorn", "cpa_scheduler.api:app", "--port", str(api_port),
         "--log-level", "warning", "--no-access-log"],
        {**env, "DATABASE_URL": api_url},
        f"http://127.0.0.1:{api_port}",
    )  # fmt: skip
    targets = {
        "ours": (f"http://127.0.0.1:{ours_port}/v1/jobs", {"graph": GRAPH},
                 {"Authorization": f"Bearer {token}"}),
        "ours (desktop graph)": (f"http://127.0.0.1:{ours_port}/v1/jobs", {"graph": DESKTOP},
                                 {"Authorization": f"Bearer {token}"}),
        "ours, API alone (uvicorn, no dispatcher)": (f"http://127.0.0.1:{api_port}/v1/jobs",
                                                     {"graph": GRAPH},
                                                     {"Authorization": f"Bearer {token}"}),
        "bare": (f"http://127.0.0.1:{bare_port}/bare", {"graph": GRAPH}, {}),
    }  # fmt: skip
    figures: dict[str, list[float]] = {}

    def record(key: str, value: float) -> None:
        figures.setdefault(key, []).append(value)
        print(f"  {key}: {value:.1f}", flush=True)

    try:
        if args.steady:
            await steady(targets, args.steady, (url, api_url))
        for rep in range(args.repeats):  # interleaved: each repeat measures every server
            print(f"repeat {rep + 1}/{args.repeats}", flush=True)
            for key, (url, body, headers) in targets.items():
                lat = await single_client(url, body, headers, args.single)
                record(f"{key}: single client p50 ms", pct(lat, 50))
                record(f"{key}: single client p99 ms", pct(lat, 99))
                for rate in RATES:
                    result = openloop(url, body, headers, rate, args.seconds)
                    record(f"{key}: {rate} req/s p50 ms", result["p50"])
                    record(f"{key}: {rate} req/s p99 ms", result["p99"])
                record(f"{key}: sustainable req/s (p99 < 100 ms)",
                       sustainable(url, body, headers, args.seconds))  # fmt: skip
    finally:
        for proc in (ours, bare, api_only):
            proc.terminate()
        for proc in (ours, bare, api_only):
            proc.wait(30)
        srv.drop_db(name)
        srv.drop_db(api_name)
        stop()
    med = {k: statistics.median(v) for k, v in figures.items()}
    print(f"\nmachine: {platform.node()} {platform.machine()} {os.cpu_count()} cores, "
          f"Python {platform.python_version()}; {args.repeats} interleaved repeats")  # fmt: skip
    print("| figure | median | range |\n|---|---|---|")
    for key, values in figures.items():
        print(f"| {key} | {med[key]:.1f} | {min(values):.1f}–{max(values):.1f} |")
    print()
    for key in ("ours", "ours (desktop graph)", "ours, API alone (uvicorn, no dispatcher)"):
        p50 = med[f"{key}: single client p50 ms"] / med["bare: single client p50 ms"]
        rate = med[f"{key}: sustainable req/s (p99 < 100 ms)"] / max(
            med["bare: sustainable req/s (p99 < 100 ms)"], 1
        )
        print(f"| {key} / bare: single-client p50 | {p50:.2f}x (target <= 2) |")
        print(f"| {key} / bare: sustainable rate | {rate:.2f}x (target >= 0.6) |")


if __name__ == "__main__":
    asyncio.run(main())
