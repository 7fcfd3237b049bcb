"""API benchmark: POST /v1/jobs (5-ToDo graph) at 32 concurrent clients against `serve`,
against a bare FastAPI route doing one insert into the same Postgres. Run: make bench."""

from __future__ import annotations

import argparse
import asyncio
import os
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
                    f"{base}/healthz" if "serve" in cmd else f"{base}/docs", timeout=1
                ).status_code
                == 200
            ):
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{cmd} did not start")


async def load(
    url: str, body: Any, headers: dict[str, str], clients: int, seconds: float
) -> tuple[float, list[float]]:
    lat: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=30) as c:

        async def worker(stop_at: float) -> None:
            nonlocal errors
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                r = await c.post(url, json=body, headers=headers)
                if r.status_code != 201:
                    errors += 1
                lat.append((time.perf_counter() - t0) * 1000)

        await asyncio.gather(
            *(worker(time.perf_counter() + 1.5) for _ in range(clients))
        )  # warm-up
        lat.clear()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(t0 + seconds) for _ in range(clients)))
        elapsed = time.perf_counter() - t0
    assert errors == 0, f"{errors} requests failed"
    return len(lat) / elapsed, lat


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--clients", type=int, default=32)
    args = ap.parse_args()
    srv, stop = server()
    name = srv.create_db(supabase=True)
    url = srv.url(name)
    tenant, user = uuid.uuid4(), uuid.uuid4()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("insert into auth.users (id) values (%s)", (user,))
        conn.execute("insert into public.tenants (id, name) values (%s, 'bench')", (tenant,))
        conn.execute(
            "insert into public.memberships (tenant_id, user_id) values (%s, %s)", (tenant, user)
        )
        conn.execute("create table public.bare (id bigserial primary key, body jsonb)")
    token = auth.mint(SECRET, user, issuer=ISSUER)
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "SUPABASE_JWT_SECRET": SECRET,
        "SUPABASE_URL": ISSUER.removesuffix("/auth/v1"),
        "CPA_RATE_LIMIT": "1000000000",
    }
    ours_port, bare_port = free_port(), free_port()
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
    results: dict[str, list[tuple[float, float, float]]] = {
        "ours": [],
        "ours (desktop graph)": [],
        "bare": [],
    }
    try:
        for rep in range(args.repeats):
            for key, target, body, headers in [
                (
                    "ours",
                    f"http://127.0.0.1:{ours_port}/v1/jobs",
                    {"graph": GRAPH},
                    {"Authorization": f"Bearer {token}"},
                ),
                (
                    "ours (desktop graph)",
                    f"http://127.0.0.1:{ours_port}/v1/jobs",
                    {"graph": DESKTOP},
                    {"Authorization": f"Bearer {token}"},
                ),
                ("bare", f"http://127.0.0.1:{bare_port}/bare", {"graph": GRAPH}, {}),
            ]:
                rate, lat = await load(target, body, headers, args.clients, args.seconds)
                results[key].append((rate, pct(lat, 50), pct(lat, 99)))
                print(
                    f"repeat {rep + 1} {key}: {rate:,.0f} req/s p50 {pct(lat, 50):.1f} ms p99 {pct(lat, 99):.1f} ms",
                    flush=True,
                )
    finally:
        ours.terminate()
        bare.terminate()
        ours.wait(30)
        bare.wait(30)
        srv.drop_db(name)
        stop()
    print()
    print(
        "| server | req/s (runs) | median req/s | median p50 ms | median p99 ms |\n|---|---|---|---|---|"
    )
    med = {}
    for key, rows in results.items():
        med[key] = statistics.median(r[0] for r in rows)
        print(
            f"| {key} | {', '.join(f'{r[0]:,.0f}' for r in rows)} | {med[key]:,.0f} | "
            f"{statistics.median(r[1] for r in rows):.1f} | {statistics.median(r[2] for r in rows):.1f} |"
        )
    print(f"\nratio ours / bare route: {med['ours'] / med['bare']:.2f}")
    print(
        f"ratio ours (desktop graph) / bare route: {med['ours (desktop graph)'] / med['bare']:.2f}"
    )


if __name__ == "__main__":
    asyncio.run(main())
