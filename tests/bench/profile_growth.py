"""Does a POST get slower as the tables grow? Batches of job creations (cpa.job_submit_v1, the
API benchmark's 5-ToDo chain, one pooled connection's worth of plans) on a fresh durable
embedded PostgreSQL, with the nested statements' mean execution time per batch
(pg_stat_statements, track = all). ``--analyze`` runs ANALYZE before every batch but the first, ``--analyze-once K`` before
batch K only.

    python -m tests.bench.profile_growth [--batches 4] [--n 600] [--analyze]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
from cpa_scheduler import embedded, migration, store

from tests.bench.bench_api import GRAPH


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--top", type=int, default=6)
    ap.add_argument("--analyze", action="store_true")
    ap.add_argument("--analyze-once", type=int, default=0, help="ANALYZE before this batch only")
    args = ap.parse_args()
    pg = embedded.EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="cpa-grow-")) / "pg", durable=True)
    pg.start()
    admin = pg.url(user=embedded.SUPERUSER)
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute("alter system set shared_preload_libraries = 'pg_stat_statements'")
        c.execute("alter system set pg_stat_statements.track = 'all'")
    pg.stop()
    pg.start()
    try:
        migration.bootstrap(admin)
        with psycopg.connect(admin, autocommit=True) as c:
            c.execute("create extension pg_stat_statements")
        url = pg.url()
        migration.apply(url)
        db = store.Store(url, max_size=4)
        tenant, user = uuid.uuid4(), uuid.uuid4()
        async with db.admin() as s:
            await s.membership_ensure(tenant, user, tenant_name="bench")
        claims = {"sub": str(user), "role": "authenticated", "aud": "authenticated"}
        for batch in range(args.batches):
            with psycopg.connect(admin, autocommit=True) as c:
                c.execute("select pg_stat_statements_reset()")
                if (args.analyze and batch) or (
                    args.analyze_once and batch == args.analyze_once - 1
                ):
                    c.execute("analyze")
            lat = []
            for _ in range(args.n):
                t0 = time.perf_counter()
                async with db.user(claims) as s:
                    await s.job_submit(tenant_id=None, todos=GRAPH["todos"], request=None,
                                       intent="explicit", idempotency_key=None, priority=0,
                                       run_at=None, time_zone="UTC", traceparent=None,
                                       rate_limit=(10**9, 60))  # fmt: skip
                lat.append((time.perf_counter() - t0) * 1000)
            print(f"batch {batch + 1} (jobs {batch * args.n}–{(batch + 1) * args.n}): "
                  f"store call p50 {statistics.median(lat):.2f} ms")  # fmt: skip
            with psycopg.connect(admin, autocommit=True) as c:
                rows = c.execute(
                    "select calls, round(mean_exec_time::numeric, 3),"
                    " regexp_replace(left(query, 90), '\\s+', ' ', 'g')"
                    " from pg_stat_statements where query not ilike '%%pg_stat_statements%%'"
                    " and query not ilike 'analyze%%'"
                    " order by total_exec_time desc limit %s",
                    (args.top,),
                ).fetchall()
            for calls, mean, query in rows:
                print(f"  {calls:6} × {mean:7} ms  {query}")
        await db.close()
    finally:
        pg.stop()


if __name__ == "__main__":
    asyncio.run(main())
