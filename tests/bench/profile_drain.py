"""Where the database time of a 1 x 10,000 no-op drain goes: pg_stat_statements, nested
statements included (track = all), on a private durable embedded PostgreSQL.

    python -m tests.bench.profile_drain [--n 10000] [--chains 100] [--upto VERSION]

Top-level statements (the dispatcher's calls) and the statements they run inside functions and
triggers are listed separately; a nested statement's time is part of its caller's.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

import psycopg
from cpa_scheduler import embedded, migration, store

from tests.bench.bench_dispatch import _vacuum, create_jobs, drain, tenant
from tests.bench.bench_event_steps import prefix_dir


async def creates(db: store.Store, tenant_id: object, n: int) -> None:
    """N creations of the API benchmark's 5-ToDo chain, as POST /v1/jobs makes them."""
    import uuid

    from tests.bench.bench_api import GRAPH

    user = uuid.uuid4()
    async with db.admin() as s:
        await s.membership_ensure(tenant_id, user, tenant_name="bench")  # type: ignore[arg-type]
    claims = {"sub": str(user), "role": "authenticated", "aud": "authenticated"}
    for _ in range(n):
        async with db.user(claims) as s:
            await s.job_submit(tenant_id=None, todos=GRAPH["todos"], request=None,
                               intent="explicit", idempotency_key=None, priority=0, run_at=None,
                               time_zone="UTC", traceparent=None, rate_limit=(10**9, 60))  # fmt: skip
    print(f"{n} job creations")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--upto", default=None, help="apply migrations up to this version only")
    ap.add_argument(
        "--chains",
        type=int,
        default=0,
        help="drain N jobs of n/N-ToDo chains (as bench_dispatch's chains) instead",
    )
    ap.add_argument(
        "--creates",
        type=int,
        default=0,
        help="profile N POST-shaped job creations (cpa.job_submit_v1) instead",
    )
    args = ap.parse_args()
    pg = embedded.EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="cpa-prof-")) / "pg", durable=True)
    pg.start()
    admin = pg.url(user=embedded.SUPERUSER)
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute("alter system set shared_preload_libraries = 'pg_stat_statements'")
        c.execute("alter system set pg_stat_statements.track = 'all'")
    pg.stop()
    pg.start()
    try:
        folder = prefix_dir(args.upto) if args.upto else None
        migration.bootstrap(admin, folder)
        with psycopg.connect(admin, autocommit=True) as c:
            c.execute("create extension pg_stat_statements")
        url = pg.url()
        migration.apply(url, folder)
        db = store.Store(url, max_size=4)
        t = await tenant(db)
        # A job holds at most 1000 ToDos (enforced in SQL since issue 10): n in jobs of 1000,
        # as bench_dispatch creates them.
        if args.chains:
            length = args.n // args.chains
            chain = [{"key": f"c{i}", "action": "noop", "depends_on": [f"c{i - 1}"] if i else []}
                     for i in range(length)]  # fmt: skip
            await create_jobs(db, t, [chain] * args.chains)
        else:
            todos = [{"key": f"k{i}", "action": "noop", "target": "cloud"} for i in range(args.n)]
            await create_jobs(db, t, [todos[i : i + 1000] for i in range(0, args.n, 1000)])
        await _vacuum(url)
        with psycopg.connect(admin, autocommit=True) as c:
            c.execute("select pg_stat_statements_reset()")
        if args.creates:
            await creates(db, t, args.creates)
        else:
            elapsed, summary = await drain(db)
            print(
                f"drain: {summary.done} ToDos in {elapsed:.2f} s = {summary.done / elapsed:,.0f}/s"
            )
        await db.close()
        with psycopg.connect(admin, autocommit=True) as c:
            for top in (True, False):
                rows = c.execute(
                    "select calls, round(total_exec_time::numeric, 1) as ms, rows,"
                    " regexp_replace(left(query, 110), '\\s+', ' ', 'g') as q"
                    " from pg_stat_statements where toplevel = %s"
                    " and query not ilike '%%pg_stat_statements%%'"
                    " order by total_exec_time desc limit %s",
                    (top, args.top),
                ).fetchall()
                print(f"\n{'top-level' if top else 'nested (inside functions/triggers)'}:")
                print("| calls | total ms | rows | statement |\n|---|---|---|---|")
                for calls, ms, nrows, q in rows:
                    print(f"| {calls} | {ms} | {nrows} | `{q.replace('|', '/')}` |")
            row = c.execute(
                "select round(sum(total_exec_time)::numeric, 1) from pg_stat_statements"
                " where toplevel and query not ilike '%%pg_stat_statements%%'"
            ).fetchone()
            print(f"\ntotal top-level execution time: {row[0] if row else 0} ms")
    finally:
        pg.stop()


if __name__ == "__main__":
    asyncio.run(main())
