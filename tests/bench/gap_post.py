"""Single-client POST /v1/jobs over HTTP against the bare route, interleaved in one run, with the
same request in process (ASGI transport, the app built from the same environment): where the
HTTP request's extra time goes. Medians of ``--rounds`` rounds of ``--n`` requests each.

    python -m tests.bench.gap_post [--rounds 5] [--n 100]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psycopg
from cpa_scheduler import auth, migration
from psycopg.conninfo import conninfo_to_dict

from tests.bench.bench_api import GRAPH, ISSUER, SECRET, free_port, start
from tests.bench.bench_dispatch import server


async def rounds(client: httpx.AsyncClient, url: str, body: Any, headers: dict[str, str],
                 n: int) -> float:  # fmt: skip
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = await client.post(url, json=body, headers=headers)
        assert r.status_code in (200, 201), r.text
        lat.append((time.perf_counter() - t0) * 1000)
    return statistics.median(lat)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--in-process", action="store_true", help="also the ASGI app in this process")
    ap.add_argument(
        "--base",
        default=None,
        help="a folder holding another version's shared/ and supabase/ (git archive): served "
        "too, on a database migrated from its supabase/",
    )
    ap.add_argument(
        "--steady",
        type=int,
        default=0,
        help="first create N jobs through each API, then ANALYZE (see bench_api.steady)",
    )
    args = ap.parse_args()
    srv, stop = server()
    name = srv.create_db(supabase=True)
    url = srv.url(name)
    names = [name]
    base_url = url
    if args.base:
        # The other version runs on a database of its own, migrated from its own supabase/
        # folder: its SQL is compared too, not only its Python.
        base_name = srv.create_db(supabase=False)
        names.append(base_name)
        base_url = srv.url(base_name)
        folder = Path(args.base) / "supabase"
        admin = str(conninfo_to_dict(srv.admin_url)["user"])
        migration.bootstrap(srv.url(base_name, user=admin), folder)
        migration.apply(base_url, folder)
    tenant, user = uuid.uuid4(), uuid.uuid4()
    for db_url in dict.fromkeys([url, base_url]):
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute("insert into auth.users (id) values (%s)", (user,))
            conn.execute("insert into public.tenants (id, name) values (%s, 'g')", (tenant,))
            conn.execute("insert into public.memberships (tenant_id, user_id) values (%s, %s)",
                         (tenant, user))  # fmt: skip
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("create table public.bare (id bigserial primary key, body jsonb)")
    token = auth.mint(SECRET, user, issuer=ISSUER)
    env = {**os.environ, "DATABASE_URL": url, "SUPABASE_JWT_SECRET": SECRET,
           "SUPABASE_URL": ISSUER.removesuffix("/auth/v1"), "CPA_RATE_LIMIT": "1000000000"}  # fmt: skip
    uv = [sys.executable, "-m", "uvicorn", "--log-level", "warning", "--no-access-log"]
    p_ours, p_bare = free_port(), free_port()
    ours = start([*uv, "cpa_scheduler.api:app", "--port", str(p_ours)], env,
                 f"http://127.0.0.1:{p_ours}")  # fmt: skip
    bare = start([*uv, "tests.bench.bare_app:app", "--port", str(p_bare)], env,
                 f"http://127.0.0.1:{p_bare}")  # fmt: skip
    base = None
    if args.base:
        p_base = free_port()
        base_env = {**env, "PYTHONPATH": os.path.join(args.base, "shared"),
                    "PYTHONDONTWRITEBYTECODE": "1", "DATABASE_URL": base_url}  # fmt: skip
        base = start([*uv, "cpa_scheduler.api:app", "--port", str(p_base)], base_env,
                     f"http://127.0.0.1:{p_base}")  # fmt: skip
    auth_h = {"Authorization": f"Bearer {token}"}
    body = {"graph": GRAPH}
    targets: dict[str, tuple[httpx.AsyncClient, str, dict[str, str]]] = {}
    http = httpx.AsyncClient(timeout=30)
    targets["ours (HTTP)"] = (http, f"http://127.0.0.1:{p_ours}/v1/jobs", auth_h)
    if base is not None:
        targets["base (HTTP)"] = (http, f"http://127.0.0.1:{p_base}/v1/jobs", auth_h)
    targets["bare (HTTP)"] = (http, f"http://127.0.0.1:{p_bare}/bare", {})
    inproc = None
    if args.in_process:
        os.environ.update(env)
        from cpa_scheduler import api

        inproc = httpx.AsyncClient(transport=httpx.ASGITransport(app=api.create_app()),
                                   base_url="http://t")  # fmt: skip
        targets["ours (in process)"] = (inproc, "/v1/jobs", auth_h)
    figures: dict[str, list[float]] = {k: [] for k in targets}
    try:
        for c, u, h in targets.values():
            await rounds(c, u, body, h, 30)  # warm-up
        if args.steady:
            for key, (c, u, h) in targets.items():
                if not key.startswith("bare"):
                    await rounds(c, u, body, h, args.steady)
            for db_url in dict.fromkeys([url, base_url]):
                with psycopg.connect(db_url, autocommit=True) as conn:
                    conn.execute("analyze")
        for _ in range(args.rounds):
            for key, (c, u, h) in targets.items():
                figures[key].append(await rounds(c, u, body, h, args.n))
            print("  " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in figures.items()), flush=True)
    finally:
        await http.aclose()
        if inproc is not None:
            await inproc.aclose()
        for proc in (ours, bare, *([base] if base else [])):
            proc.terminate()
            proc.wait(30)
        for db in names:
            srv.drop_db(db)
        stop()
    bare_p50 = statistics.median(figures["bare (HTTP)"])
    for key, values in figures.items():
        m = statistics.median(values)
        print(f"{key}: p50 median {m:.2f} ms ({min(values):.2f}–{max(values):.2f}), "
              f"{m / bare_p50:.2f}x bare")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
