"""Where the time of one POST /v1/jobs goes (single client, 5-ToDo graph): the database call
alone, the store layer (transaction + claims + call + commit), and the whole ASGI route in
process (no network), each a median of N sequential requests; then a cProfile of the route.

    python -m tests.bench.profile_post [--n 300]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import statistics
import time
import uuid
from typing import Any

import httpx
import psycopg
from cpa_scheduler import api, auth, graph, intents, query, service, settings, store

from tests.bench.bench_api import GRAPH, ISSUER, SECRET
from tests.bench.bench_dispatch import server


def med(xs: list[float]) -> str:
    xs = sorted(xs)
    return f"p50 {statistics.median(xs):.2f} ms (p90 {xs[int(0.9 * (len(xs) - 1))]:.2f})"


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument(
        "--steady",
        type=int,
        default=0,
        help="first create N jobs, then ANALYZE (a database past its first minutes)",
    )
    args = ap.parse_args()
    srv, stop = server()
    name = srv.create_db(supabase=True)
    url = srv.url(name)
    try:
        tenant, user = uuid.uuid4(), uuid.uuid4()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("insert into auth.users (id) values (%s)", (user,))
            conn.execute("insert into public.tenants (id, name) values (%s, 'p')", (tenant,))
            conn.execute("insert into public.memberships (tenant_id, user_id) values (%s, %s)",
                         (tenant, user))  # fmt: skip
        token = auth.mint(SECRET, user, issuer=ISSUER)
        verifier = auth.Verifier(hs256_secret=SECRET, issuer=ISSUER)
        claims = verifier.verify(token).for_database()
        db = store.Store(url, max_size=4)
        rows = graph.todo_rows(intents.plan(text=None, spec=_spec(), planner_configured=False)[1])

        async def rtt() -> None:
            async with db.user(claims) as s:
                await s.conn.execute("select 1")

        async def create() -> None:
            async with db.user(claims) as s:
                await s.job_submit(tenant_id=None, todos=rows, request=None, intent="explicit",
                                   idempotency_key=None, priority=0, run_at=None,
                                   time_zone="UTC", traceparent=None, rate_limit=(10**9, 60))  # fmt: skip

        submission = store.Submission(
            tenant_id=None, todos=rows, request=None, intent="explicit", idempotency_key=None,
            priority=0, run_at=None, time_zone="UTC", traceparent=None, rate_limit=(10**9, 60),
        )  # fmt: skip

        async def one_trip() -> None:  # what the route does: claims, call and commit pipelined
            await db.submit(claims, submission)

        async def old_path() -> None:  # what the route did before: 4 calls in the transaction
            async with db.user(claims) as s:
                [tid] = await s.my_tenants()
                job = await s.job_create(tenant_id=tid, todos=rows, request=None,
                                         intent="explicit")  # fmt: skip
                await s.job_todos(job.id)
                await s.rate_limit_hit(tid, 10**9, 60)

        async def rolled_back() -> None:  # the same call, no commit (no WAL flush)
            async with db._pool.connection() as conn:
                async with conn.transaction(force_rollback=True):
                    await conn.execute("select set_config('role', 'authenticated', true),"
                                       " set_config('request.jwt.claims', %s, true)",
                                       (query._jsonb(claims),))  # fmt: skip
                    s = store.Session(conn)
                    await s.job_submit(tenant_id=None, todos=rows, request=None, intent="explicit",
                                       idempotency_key=None, priority=0, run_at=None,
                                       time_zone="UTC", traceparent=None, rate_limit=(10**9, 60))  # fmt: skip

        cfg = settings.Settings(database_url=url, supabase_jwt_secret=SECRET,
                                supabase_url=ISSUER.removesuffix("/auth/v1"), rate_limit=10**9)  # fmt: skip
        app = api.create_app(service.Services(cfg, db, verifier=verifier))
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
        headers = {"Authorization": f"Bearer {token}"}

        async def route() -> None:
            r = await client.post("/v1/jobs", json={"graph": GRAPH}, headers=headers)
            assert r.status_code == 201, r.text

        steps: dict[str, Any] = {
            "transaction + claims + select 1 + commit (no write)": rtt,
            "cpa.job_submit in the user scope, rolled back": rolled_back,
            "store: transaction + claims + job_submit + commit": create,
            "store: the same in one round trip (Store.submit)": one_trip,
            "store, the old path: tenants, create, read-back, rate limit (4 calls) + commit": old_path,
            "ASGI route in process (no network)": route,
        }
        times: dict[str, list[float]] = {k: [] for k in steps}
        for _ in range(20):
            for fn in steps.values():
                await fn()
        if args.steady:
            for _ in range(args.steady):
                await create()
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("analyze")
        for _ in range(args.n):  # interleaved
            for key, fn in steps.items():
                t0 = time.perf_counter()
                await fn()
                times[key].append((time.perf_counter() - t0) * 1000)
        for key, xs in times.items():
            print(f"{key}: {med(xs)}")
        prof = cProfile.Profile()
        cpu0 = time.process_time()
        prof.enable()
        for _ in range(args.n):
            await route()
        prof.disable()
        print(
            f"\nroute: Python CPU per request {(time.process_time() - cpu0) / args.n * 1000:.2f} ms"
        )
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(18)
        print(out.getvalue()[:6000])
        await client.aclose()
        await db.close()
    finally:
        srv.drop_db(name)
        stop()


def _spec() -> Any:
    from cpa_scheduler import protocol

    return protocol.GraphSpec.model_validate(GRAPH)


if __name__ == "__main__":
    asyncio.run(main())
