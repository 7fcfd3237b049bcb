"""Dispatcher benchmark: throughput against PgQueuer and Procrastinate, makespan, latency.

Run with ``make bench`` (or ``python -m tests.bench.bench_dispatch``). Every system gets a fresh
database on the same PostgreSQL server: a durable embedded server under ``.bench/`` unless
BENCH_DATABASE_URL names a superuser URL of another server. Each figure is measured REPEATS
times, interleaved, and the median is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg
from cpa_scheduler import dispatch, embedded, executor, graph, migration, store
from psycopg.conninfo import conninfo_to_dict, make_conninfo

ROOT = Path(__file__).resolve().parents[2]


class Server:
    def __init__(self, admin_url: str, app_user: str) -> None:
        self.admin_url = admin_url
        self.app_user = app_user

    def url(self, db: str, user: str | None = None) -> str:
        p = conninfo_to_dict(self.admin_url)
        p.update(dbname=db, user=user or self.app_user)
        return make_conninfo(**p)

    def dsn(self, db: str) -> str:
        p = conninfo_to_dict(self.admin_url)
        return (
            f"postgresql://{self.app_user}@{p.get('host', '127.0.0.1')}:{p.get('port', 5432)}/{db}"
        )

    def create_db(self, *, supabase: bool) -> str:
        name = f"bench_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(
            self.url("postgres", user=conninfo_to_dict(self.admin_url)["user"]), autocommit=True
        ) as c:
            c.execute(f'create database "{name}" owner "{self.app_user}"')
        if supabase:
            admin = conninfo_to_dict(self.admin_url)["user"]
            migration.bootstrap(self.url(name, user=str(admin)))
            migration.apply(self.url(name))
        return name

    def drop_db(self, name: str) -> None:
        with psycopg.connect(
            self.url("postgres", user=conninfo_to_dict(self.admin_url)["user"]), autocommit=True
        ) as c:
            c.execute(f'drop database if exists "{name}" with (force)')


def server() -> tuple[Server, Callable[[], None]]:
    url = os.environ.get("BENCH_DATABASE_URL")
    if url:
        user = conninfo_to_dict(url).get("user") or "postgres"
        migration.bootstrap(url)
        return Server(url, str(user)), lambda: None
    pg = embedded.EmbeddedPostgres(ROOT / ".bench" / "pg", durable=True)
    pg.start()
    admin = pg.url(user=embedded.SUPERUSER)
    migration.bootstrap(admin)
    return Server(admin, "postgres"), pg.stop


async def tenant(db: store.Store) -> uuid.UUID:
    t, u = uuid.uuid4(), uuid.uuid4()
    async with db.admin() as s:
        await s.membership_ensure(t, u, tenant_name="bench")
    return t


async def create_jobs(
    db: store.Store, tenant_id: uuid.UUID, graphs: list[list[dict[str, Any]]]
) -> list[Any]:
    ids = []
    for todos in graphs:
        async with db.service() as s:
            ids.append((await s.job_create(tenant_id=tenant_id, todos=todos)).id)
    return ids


async def drain(
    db: store.Store, concurrency: int = 256, batch: int = 128
) -> tuple[float, dispatch.Summary]:
    """A pass of the dispatcher (its defaults unless given) until no work is left."""
    # One tenant here: no per-tenant cap, as in the runs RESULTS.md quotes (issue 10 added it).
    d = dispatch.Dispatcher(db, concurrency=concurrency, batch=batch, tenant_cap=None)
    t0 = time.perf_counter()
    summary = await d.run_pass(600)
    return time.perf_counter() - t0, summary


# --- (a) our throughput ------------------------------------------------------------------------


async def ours_wide(srv: Server, n: int, concurrency: int = 256, batch: int = 128) -> float:
    name = srv.create_db(supabase=True)
    try:
        db = store.Store(srv.url(name), max_size=4)
        t = await tenant(db)
        # A job holds at most 1000 ToDos (enforced in SQL since issue 10): n in jobs of 1000.
        todos = [{"key": f"k{i}", "action": "noop", "target": "cloud"} for i in range(n)]
        await create_jobs(db, t, [todos[i : i + 1000] for i in range(0, n, 1000)])
        await _vacuum(srv.url(name))
        elapsed, summary = await drain(db, concurrency, batch)
        assert summary.done == n, summary
        await db.close()
        return n / elapsed
    finally:
        srv.drop_db(name)


async def ours_chains(srv: Server, jobs: int, length: int) -> float:
    name = srv.create_db(supabase=True)
    try:
        db = store.Store(srv.url(name), max_size=4)
        t = await tenant(db)
        chains = [[{"key": f"c{i}", "action": "noop", "depends_on": [f"c{i - 1}"] if i else []}
                   for i in range(length)] for _ in range(jobs)]  # fmt: skip
        await create_jobs(db, t, chains)
        await _vacuum(srv.url(name))
        elapsed, summary = await drain(db)
        assert summary.done == jobs * length, summary
        await db.close()
        return jobs * length / elapsed
    finally:
        srv.drop_db(name)


async def _vacuum(url: str) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as c:
        await c.execute("vacuum analyze")


async def fairness(srv: Server, big: int = 5000, small: int = 50) -> float:
    """Tenant B's small job submitted right after tenant A's big work: B's time to done as a
    share of A's (0.01 = B finished within the first 1 % of A's drain). A's ToDos come in jobs
    of 1000, the most SQL allows per job since issue 10."""
    name = srv.create_db(supabase=True)
    try:
        db = store.Store(srv.url(name), max_size=4)
        a, b = await tenant(db), await tenant(db)
        todos = [{"key": f"a{i}", "action": "noop"} for i in range(big)]
        jas = await create_jobs(db, a, [todos[i : i + 1000] for i in range(0, big, 1000)])
        [jb] = await create_jobs(
            db, b, [[{"key": f"b{i}", "action": "noop"} for i in range(small)]]
        )
        await _vacuum(srv.url(name))
        await drain(db)
        async with db.service() as s:
            jobs_a = [await s.job_get(j) for j in jas]
            job_b = await s.job_get(jb)
        await db.close()
        start_a = min(j.started_at for j in jobs_a if j.started_at is not None)
        end_a = max(j.completed_at for j in jobs_a if j.completed_at is not None)
        assert job_b.completed_at is not None
        span_a = (end_a - start_a).total_seconds()
        return float((job_b.completed_at - start_a).total_seconds() / span_a)
    finally:
        srv.drop_db(name)


# --- (b) peers ----------------------------------------------------------------------------------


async def pgqueuer_run(srv: Server, n: int, batch_size: int) -> float:
    import asyncpg
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.domain.types import QueueExecutionMode
    from pgqueuer.qm import QueueManager
    from pgqueuer.queries import Queries

    name = srv.create_db(supabase=False)
    try:
        conn = await asyncpg.connect(srv.dsn(name))
        driver = AsyncpgDriver(conn)
        q = Queries(driver)
        await q.install()
        for start in range(0, n, 1000):
            k = min(1000, n - start)
            await q.enqueue(["noop"] * k, [None] * k, [0] * k)
        await conn.execute("vacuum analyze")
        qm = QueueManager(q)

        @qm.entrypoint("noop")
        async def noop(job: Any) -> None:
            return None

        t0 = time.perf_counter()
        await qm.run(mode=QueueExecutionMode.drain, batch_size=batch_size,
                     max_concurrent_tasks=max(2 * batch_size, 16))  # fmt: skip
        elapsed = time.perf_counter() - t0
        left = await conn.fetchval("select count(*) from pgqueuer")
        assert left == 0, left
        await conn.close()
        return n / elapsed
    finally:
        srv.drop_db(name)


async def procrastinate_run(srv: Server, n: int, concurrency: int) -> float:
    import procrastinate

    name = srv.create_db(supabase=False)
    try:
        app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=srv.url(name)))

        @app.task(name="noop")
        async def noop() -> None:
            return None

        async with app.open_async():
            await app.schema_manager.apply_schema_async()
            for start in range(0, n, 1000):
                await noop.batch_defer_async(*[{} for _ in range(min(1000, n - start))])
            t0 = time.perf_counter()
            await app.run_worker_async(
                wait=False, concurrency=concurrency, install_signal_handlers=False
            )
            elapsed = time.perf_counter() - t0
        with psycopg.connect(srv.url(name)) as c:
            row = c.execute(
                "select count(*) from procrastinate_jobs where status <> 'succeeded'"
            ).fetchone()
            assert row is not None and row[0] == 0, row
        return n / elapsed
    finally:
        srv.drop_db(name)


async def baseline_run(srv: Server, chains: list[int]) -> float:
    from tests.bench import baseline

    name = srv.create_db(supabase=False)
    try:
        return await baseline.run(srv.url(name), chains)
    finally:
        srv.drop_db(name)


# --- (d) makespan -------------------------------------------------------------------------------


def random_dag(rnd: random.Random, n: int) -> tuple[list[dict[str, Any]], dict[str, float]]:
    todos, durations = [], {}
    for i in range(n):
        deps = (
            sorted({f"t{rnd.randrange(max(0, i - 30), i)}" for _ in range(rnd.randint(0, 3))})
            if i
            else []
        )
        ms = rnd.randint(20, 100)
        durations[f"t{i}"] = ms / 1000
        todos.append(
            {"key": f"t{i}", "action": "noop", "params": {"duration_ms": ms}, "depends_on": deps}
        )
    return todos, durations


async def makespan(srv: Server, seed: int) -> tuple[float, float]:
    """(ours / critical path, level-by-level / critical path) for one random 200-ToDo DAG."""
    rnd = random.Random(seed)
    todos, durations = random_dag(rnd, 200)
    g = graph.Graph(
        graph.ToDo(key=t["key"], action="noop", depends_on=tuple(t["depends_on"])) for t in todos
    )
    cp = g.critical_path(durations)
    name = srv.create_db(supabase=True)
    try:
        db = store.Store(srv.url(name), max_size=4)
        t = await tenant(db)
        [job_id] = await create_jobs(db, t, [todos])
        d = dispatch.Dispatcher(db, concurrency=200, batch=200, tenant_cap=None)
        await d.run_pass(600)
        async with db.service() as s:
            job = await s.job_get(job_id)
        assert job.status == "done"
        # The job's own span: its first ToDo starting to its last one finishing.
        ours = (job.completed_at - job.started_at).total_seconds()
        await db.close()
    finally:
        srv.drop_db(name)
    # Baseline: run each level with full parallelism, wait for the whole level, then the next.
    t0 = time.perf_counter()
    for level in g.batches():
        await asyncio.gather(*(asyncio.sleep(durations[k]) for k in level))
    levels = time.perf_counter() - t0
    return ours / cp, levels / cp


# --- (e) latency --------------------------------------------------------------------------------


async def _stamp(params: dict[str, Any], ctx: executor.Context) -> executor.Outcome:
    return executor.Done({"at": time.time()})


async def latency(srv: Server, jobs: int = 100, length: int = 5) -> list[float]:
    """Milliseconds from a dependency finishing to its dependent starting, long-running mode.

    Measured by the executors' own wall clock (each ToDo stores when it ran): the database's
    ``finished_at`` and ``started_at`` are ``now()``, the start of their transactions, so a
    dependent claimed in the transaction that completes its dependency would read 0 ms although
    it starts only once that transaction has committed and answered.
    """
    name = srv.create_db(supabase=True)
    try:
        url = srv.url(name)
        db = store.Store(url, max_size=6)
        t = await tenant(db)
        async with db.admin() as s:
            await s.conn.execute(
                "insert into private.catalogue_actions (name, target) values ('stamp', 'cloud')"
                " on conflict (name) do nothing"
            )
        stop = asyncio.Event()
        d = dispatch.Dispatcher(db, concurrency=64, batch=50, tenant_cap=None)
        d.registry.register("stamp", _stamp)  # a noop that says when it ran
        runner = asyncio.create_task(d.run_forever(url, stop=stop, sweep_interval=1.0))
        await asyncio.sleep(0.5)
        chain = [
            {"key": f"c{i}", "action": "stamp", "depends_on": [f"c{i - 1}"] if i else []}
            for i in range(length)
        ]
        for _ in range(jobs):
            await create_jobs(db, t, [chain])
            await asyncio.sleep(0.01)
        for _ in range(600):
            async with db.service() as s:
                cur = await s.conn.execute(
                    "select count(*) as n from public.jobs where status <> 'done'"
                )
                row = await cur.fetchone()
            if row is not None and row["n"] == 0:
                break
            await asyncio.sleep(0.05)
        stop.set()
        await runner
        async with db.service() as s:
            cur = await s.conn.execute(
                "select ((c.result ->> 'at')::float8 - (p.result ->> 'at')::float8) * 1000 as ms"
                " from public.todo_edges e join public.todos c on c.id = e.todo_id"
                " join public.todos p on p.id = e.depends_on_id"
            )
            rows = await cur.fetchall()
        await db.close()
        return [float(r["ms"]) for r in rows]
    finally:
        srv.drop_db(name)


def fmt(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.2f}"


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n", type=int, default=10_000)
    args = ap.parse_args()
    srv, stop = server()
    figures: dict[str, list[float]] = {}

    def record(key: str, value: float) -> None:
        figures.setdefault(key, []).append(value)
        print(f"  {key}: {fmt(value)}", flush=True)

    runs: list[tuple[str, Callable[[], Awaitable[float]]]] = [
        ("ours: 1 job x 10,000 independent", lambda: ours_wide(srv, args.n)),
        (
            "ours: 1 job x 10,000 independent, concurrency 128 batch 100 (old default)",
            lambda: ours_wide(srv, args.n, 128, 100),
        ),
        ("ours: 100 jobs x 100-ToDo chains", lambda: ours_chains(srv, 100, args.n // 100)),
        ("PgQueuer 1.6 (asyncpg, batch 10)", lambda: pgqueuer_run(srv, args.n, 10)),
        ("PgQueuer 1.6 (asyncpg, batch 50)", lambda: pgqueuer_run(srv, args.n, 50)),
        ("Procrastinate 3.10 (concurrency 16)", lambda: procrastinate_run(srv, args.n, 16)),
        ("hand-written baseline: 1 x 10,000", lambda: baseline_run(srv, [1] * args.n)),
        (
            "hand-written baseline: 100 x 100 chains",
            lambda: baseline_run(srv, [args.n // 100] * 100),
        ),
    ]
    try:
        for rep in range(args.repeats):
            print(f"repeat {rep + 1}/{args.repeats}", flush=True)
            for key, run in runs:
                record(key, await run())
            ours_ratio, level_ratio = await makespan(srv, seed=rep)
            record("makespan / critical path: ours", ours_ratio)
            record("makespan / critical path: level-by-level", level_ratio)
            record("fairness: small tenant done / big tenant span", await fairness(srv))
            lat = await latency(srv)
            record("latency p50 ms (executor clock)", pct(lat, 50))
            record("latency p99 ms (executor clock)", pct(lat, 99))
    finally:
        stop()

    med = {k: statistics.median(v) for k, v in figures.items()}
    print()
    print(
        f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    print("| figure | runs | median |\n|---|---|---|")
    for key, values in figures.items():
        print(f"| {key} | {', '.join(fmt(v) for v in values)} | {fmt(med[key])} |")
    pgq50 = med["PgQueuer 1.6 (asyncpg, batch 50)"]
    for ours_key in ("ours: 1 job x 10,000 independent", "ours: 100 jobs x 100-ToDo chains"):
        print(f"| {ours_key} / PgQueuer batch 50 | {med[ours_key] / pgq50:.2f} |")
    best_pgq = max(med["PgQueuer 1.6 (asyncpg, batch 10)"], med["PgQueuer 1.6 (asyncpg, batch 50)"])
    print()
    pairs = {
        "ours: 1 job x 10,000 independent": "hand-written baseline: 1 x 10,000",
        "ours: 100 jobs x 100-ToDo chains": "hand-written baseline: 100 x 100 chains",
    }
    for ours_key, base_key in pairs.items():
        print(f"| {ours_key} / hand-written baseline | {med[ours_key] / med[base_key]:.2f} |")
    for ours_key in ("ours: 1 job x 10,000 independent", "ours: 100 jobs x 100-ToDo chains"):
        print(f"| {ours_key} / best PgQueuer | {med[ours_key] / best_pgq:.2f} |")
        print(
            f"| {ours_key} / Procrastinate | {med[ours_key] / med['Procrastinate 3.10 (concurrency 16)']:.2f} |"
        )


if __name__ == "__main__":
    asyncio.run(main())
