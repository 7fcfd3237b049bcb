"""Timer lateness of the long-running dispatcher: 200 timed ToDos, started_at - run_at.

Run with ``python -m tests.bench.bench_timers`` (``BENCH_DATABASE_URL``: a superuser URL; the
default is the machine's PostgreSQL at 127.0.0.1:5432). Each ToDo is its own job with ``run_at``
spread over the next ``--spread`` seconds; the dispatcher runs in long-running mode, which has no
NOTIFY for a ToDo whose time comes, only its alarm. Lateness is read from the database clock.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import uuid
from datetime import UTC, datetime, timedelta

import psycopg
from cpa_scheduler import dispatch, migration, store
from psycopg.conninfo import conninfo_to_dict, make_conninfo


async def run(admin_url: str, count: int, spread: float) -> dict[str, float]:
    name = f"bench_timers_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'create database "{name}"')
    params = conninfo_to_dict(admin_url)
    params.update(dbname=name)
    url = make_conninfo(**params)
    try:
        migration.bootstrap(url)
        migration.apply(url)
        db = store.Store(url, max_size=8)
        tenant, user = uuid.uuid4(), uuid.uuid4()
        async with db.admin() as s:
            await s.membership_ensure(tenant, user, tenant_name="bench")
        start = datetime.now(UTC) + timedelta(seconds=1)
        rnd = random.Random(12)
        async with db.service() as s:
            for _ in range(count):
                at = start + timedelta(seconds=rnd.uniform(0, spread))
                await s.job_create(
                    tenant_id=tenant, todos=[{"key": "t", "action": "noop"}], run_at=at
                )
        stop = asyncio.Event()
        dispatcher = dispatch.Dispatcher(db)
        worker = asyncio.create_task(dispatcher.run_forever(url, stop=stop))
        deadline = start + timedelta(seconds=spread + 30)
        while datetime.now(UTC) < deadline:
            await asyncio.sleep(0.5)
            async with db.admin() as s:
                cur = await s.conn.execute(
                    "select count(*) as n from public.todos where status = 'done'"
                )
                row = await cur.fetchone()
            if row and row["n"] >= count:
                break
        stop.set()
        await worker
        async with db.admin() as s:
            cur = await s.conn.execute(
                "select extract(epoch from started_at - run_at) * 1000 as ms from public.todos"
            )
            late = sorted(float(r["ms"]) for r in await cur.fetchall())
        await db.close()
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'drop database if exists "{name}" with (force)')
    assert len(late) == count
    q = statistics.quantiles(late, n=100)
    return {"n": count, "min_ms": late[0], "p50_ms": q[49], "p99_ms": q[98], "max_ms": late[-1]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--count", type=int, default=200)
    p.add_argument("--spread", type=float, default=10.0, help="seconds run_at is spread over")
    args = p.parse_args()
    admin = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    result = asyncio.run(run(admin, args.count, args.spread))
    print(
        " ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items())
    )


if __name__ == "__main__":
    main()
