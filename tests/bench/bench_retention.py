"""One day's retention at 100,000 jobs a day: time, WAL and dead tuples.

    python -m tests.bench.bench_retention [--jobs 100000] [--repeats 1] [--supabase-dir DIR]

A database holds one day of history 31 days old (``--jobs`` finished jobs of 10 ToDos with 9
edges, 42 events and 3 audit entries each, tests/bench/growth_data.py; in their own daily
partition where the schema is partitioned). Retention then runs as the dispatcher's sweep runs
it, ``cpa.retention_prune_v1(30, 365, 5000)`` one transaction after another, until a call
prunes nothing. Reported: wall time and number of calls, WAL written, dead tuples left in the
tables (before any vacuum), and the time of the VACUUM that follows. ``--supabase-dir`` builds
the database from another migrations tree (the row-by-row retention before issue 24). Audit
entries are 31 days old, inside their 365 days: neither variant touches them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict

from tests.bench import growth_data
from tests.bench.bench_dispatch import server
from tests.bench.bench_growth import make_db

DEAD = """
select coalesce(sum(n_dead_tup), 0)::bigint from pg_stat_user_tables
 where schemaname in ('public', 'private')
   and (relname in ('jobs', 'todos', 'todo_edges') or relname like 'job_events%%')
"""


def one(srv: object, supabase_dir: Path | None, jobs: int) -> dict[str, float]:
    name = make_db(srv, supabase_dir)  # type: ignore[arg-type]
    admin_user = str(conninfo_to_dict(srv.admin_url)["user"])  # type: ignore[attr-defined]
    admin = srv.url(name, user=admin_user)  # type: ignore[attr-defined]
    try:
        day = (datetime.now(UTC) - timedelta(days=31)).replace(
            hour=0, minute=0, second=0, microsecond=0
        )
        built = growth_data.build(admin, jobs=jobs, start=day, span=timedelta(days=1), log=False)
        print(f"  built {jobs:,} jobs in {built:.0f} s", flush=True)
        with psycopg.connect(admin, autocommit=True) as conn:
            lsn0 = conn.execute("select pg_current_wal_lsn()").fetchone()[0]  # type: ignore[index]
            calls, totals = 0, {}
            t0 = time.perf_counter()
            while True:
                with conn.transaction():
                    conn.execute("set local role service_role")
                    row = conn.execute("select cpa.retention_prune_v1(30, 365, 5000)").fetchone()
                calls += 1
                pruned = row[0] if row else {}
                for k, v in pruned.items():
                    if k != "partitions_created":
                        totals[k] = totals.get(k, 0) + int(v)
                if not any(v for k, v in pruned.items() if k != "partitions_created"):
                    break
            elapsed = time.perf_counter() - t0
            wal = conn.execute(
                "select pg_wal_lsn_diff(pg_current_wal_lsn(), %s)::bigint", (lsn0,)
            ).fetchone()[0]  # type: ignore[index]
            time.sleep(1.5)  # table statistics reach the shared counters within a second
            dead = conn.execute(DEAD).fetchone()[0]  # type: ignore[index]
            t1 = time.perf_counter()
            conn.execute("vacuum public.jobs, public.todos, public.todo_edges, public.job_events")
            vacuum = time.perf_counter() - t1
        print(f"  pruned {json.dumps(totals)}", flush=True)
        return {"seconds": elapsed, "calls": calls, "WAL MB": wal / 1e6,
                "dead tuples": float(dead), "vacuum after s": vacuum}  # fmt: skip
    finally:
        srv.drop_db(name)  # type: ignore[attr-defined]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--supabase-dir", type=Path, default=None)
    args = ap.parse_args()
    srv, stop = server()
    figures: dict[str, list[float]] = {}
    try:
        for rep in range(args.repeats):
            print(f"repeat {rep + 1}/{args.repeats}", flush=True)
            for key, value in one(srv, args.supabase_dir, args.jobs).items():
                figures.setdefault(key, []).append(value)
                print(f"  {key}: {value:,.1f}", flush=True)
    finally:
        stop()
    print("| figure | runs | median |\n|---|---|---|")
    for key, values in figures.items():
        print(f"| {key} | {', '.join(f'{v:,.1f}' for v in values)} | "
              f"{statistics.median(values):,.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
