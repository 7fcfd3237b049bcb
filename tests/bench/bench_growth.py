"""Growth benchmark: does history (and future work) make anything slower? Run by ``make bench``
or ``python -m tests.bench.bench_growth [--jobs 100000] [--future 1000000] [--repeats 5]``.

Two databases on one server: a fresh one, and a big one holding ``--jobs`` finished jobs of 10
ToDos (their edges, 42 events each and audit entries; written set-based by
tests/bench/growth_data.py, over the last 26 days, in daily partitions) plus ``--future``
reminders (ready ToDos due in 30-330 days, over 1,000 tenants). Each repeat measures both, in
alternating order, and each figure is reported as the median of the repeats and as big / fresh:

- empty claim: database CPU of one ``cpa.todo_claim_v3`` that finds nothing (a loop of claims
  inside one DO block; the server process's CPU time from /proc/<pid>/schedstat, so neither
  client time nor waiting for a core of the shared VM is in it);
- desktop agent claim: round trip and database CPU of ``cpa.agent_claim_v2`` that finds
  nothing (the agent's role, claims and call in one transaction);
- ``POST /v1/jobs`` (the 5-ToDo chain of bench_api) p50 / p99, one client, against uvicorn;
- drain: 1 job x 10,000 no-op ToDos (plus the POSTs' ToDos), ToDos per second, the database's
  CPU per ToDo (its processes' CPU time from /proc), WAL per ToDo and the HOT share of todos /
  jobs updates;
- dependency -> dependent latency p50 / p99 (50 chains of 5, long-running dispatcher).

``--supabase-dir`` builds both databases from another migrations tree (the before picture).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from cpa_scheduler import auth, dispatch, executor, store
from cpa_scheduler import migration as migrations
from psycopg.conninfo import conninfo_to_dict

from tests.bench import growth_data
from tests.bench.bench_api import GRAPH, ISSUER, SECRET, free_port, single_client, start
from tests.bench.bench_dispatch import Server, pct, server

TENANT = uuid.UUID(int=24)
USER = uuid.UUID(int=2024)


def db_cpu_seconds(admin_url: str) -> float:
    """CPU time (user + system) of the server's processes so far: the postmaster's children."""
    with psycopg.connect(admin_url) as conn:
        row = conn.execute(
            "select setting from pg_settings where name = 'data_directory'"
        ).fetchone()
    assert row is not None
    postmaster = int((Path(row[0]) / "postmaster.pid").read_text().split()[0])
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = (Path("/proc") / entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == postmaster or int(entry) == postmaster:
            total += int(fields[11]) + int(fields[12])
    return total / ticks


def wal_lsn(admin_url: str) -> str:
    with psycopg.connect(admin_url) as conn:
        row = conn.execute("select pg_current_wal_lsn()::text").fetchone()
    assert row is not None
    return str(row[0])


def wal_bytes(admin_url: str, since: str) -> float:
    """WAL written since ``since``, server-wide (the other database is idle meanwhile)."""
    with psycopg.connect(admin_url) as conn:
        row = conn.execute(
            "select pg_wal_lsn_diff(pg_current_wal_lsn(), %s::pg_lsn)", (since,)
        ).fetchone()
    assert row is not None
    return float(row[0])


def make_db(srv: Server, supabase_dir: Path | None) -> str:
    if supabase_dir is None:
        return srv.create_db(supabase=True)
    name = srv.create_db(supabase=False)
    admin = conninfo_to_dict(srv.admin_url)["user"]
    migrations.bootstrap(srv.url(name, user=str(admin)))
    migrations.apply(srv.url(name), supabase_dir)  # type: ignore[arg-type]
    return name


def member(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("insert into auth.users (id) values (%s) on conflict do nothing", (USER,))
        conn.execute(
            "insert into public.tenants (id, name) values (%s, 'bench') on conflict do nothing",
            (TENANT,),
        )
        conn.execute(
            "insert into public.memberships (tenant_id, user_id) values (%s, %s)"
            " on conflict do nothing",
            (TENANT, USER),
        )


EMPTY_CLAIMS = """
do $$
begin
  for i in 1..%s loop
    perform count(*) from cpa.todo_claim_v3('cloud', 'bench:empty', 50);
  end loop;
end;
$$
"""


def backend_cpu_ns(conn: psycopg.Connection[Any]) -> int:
    """CPU time the connection's server process has used so far (user + system, /proc/<pid>/stat,
    in clock ticks turned into ns): unlike wall time, it does not grow while the process waits
    for a core of the shared VM. Ticks are 10 ms: callers run thousands of calls."""
    row = conn.execute("select pg_backend_pid()").fetchone()
    assert row is not None
    fields = (Path("/proc") / str(row[0]) / "stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def empty_claim_us(url: str, n: int = 5000) -> float:
    """Database CPU of one claim that finds nothing, in microseconds."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("set role service_role")
        conn.execute(EMPTY_CLAIMS.replace("%s", "50"))  # warm the plans
        cpu0 = backend_cpu_ns(conn)
        conn.execute(EMPTY_CLAIMS.replace("%s", str(n)))
        return (backend_cpu_ns(conn) - cpu0) / n / 1e3


def agent_claim_ms(url: str, n: int = 1000) -> tuple[list[float], float]:
    """Round trips of an idle desktop agent's claim (ms), and its database CPU (us per claim)."""
    claims = {"sub": str(USER), "role": "authenticated", "aud": "authenticated"}
    lat = []
    with psycopg.connect(url, autocommit=True) as conn:
        for i in range(n + 20):
            if i == 20:
                cpu0 = backend_cpu_ns(conn)
            t0 = time.perf_counter()
            with conn.transaction():
                conn.execute("set local role authenticated")
                conn.execute(
                    "select set_config('request.jwt.claims', %s, true)",
                    (json.dumps(claims),),
                )
                conn.execute(
                    "select count(*) from cpa.agent_claim_v2(%s, 'bench-agent',"
                    " array['desktop.open_app'], 10, 300)",
                    (TENANT,),
                ).fetchone()
            if i >= 20:
                lat.append((time.perf_counter() - t0) * 1000)
        cpu = (backend_cpu_ns(conn) - cpu0) / n / 1e3
    return lat, cpu


def hot(url: str) -> dict[str, tuple[int, int]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "select relname, n_tup_upd, n_tup_hot_upd from pg_stat_user_tables"
            " where relname in ('todos', 'jobs') and schemaname = 'public'"
        ).fetchall()
    return {str(r[0]): (int(r[1]), int(r[2])) for r in rows}


async def drain(url: str, admin_url: str, n: int = 10_000) -> dict[str, float]:
    db = store.Store(url, max_size=4)
    todos = [{"key": f"k{i}", "action": "noop", "target": "cloud"} for i in range(1000)]
    async with db.service() as s:
        for _ in range(n // 1000):
            await s.job_create(tenant_id=TENANT, todos=todos)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("vacuum analyze public.todos, public.jobs, public.todo_edges")
    time.sleep(1.0)
    before, cpu0, lsn0 = hot(url), db_cpu_seconds(admin_url), wal_lsn(admin_url)
    d = dispatch.Dispatcher(db, tenant_cap=None)
    t0 = time.perf_counter()
    summary = await d.run_pass(600)
    elapsed = time.perf_counter() - t0
    cpu = db_cpu_seconds(admin_url) - cpu0
    wal = wal_bytes(admin_url, lsn0)
    await db.close()
    time.sleep(1.0)  # statistics reach the shared counters within a second
    after = hot(url)

    def share(rel: str) -> float:
        upd = after[rel][0] - before[rel][0]
        return 100.0 * (after[rel][1] - before[rel][1]) / max(upd, 1)

    return {"todos/s": summary.done / elapsed, "db cpu us/todo": cpu / summary.done * 1e6,
            "WAL bytes/todo": wal / summary.done,
            "HOT % todos": share("todos"), "HOT % jobs": share("jobs")}  # fmt: skip


async def _stamp(params: dict[str, Any], ctx: executor.Context) -> executor.Outcome:
    return executor.Done({"at": time.time()})


async def latency(url: str, jobs: int = 50, length: int = 5) -> list[float]:
    db = store.Store(url, max_size=6)
    async with db.admin() as s:
        await s.conn.execute(
            "insert into private.catalogue_actions (name, target) values ('stamp', 'cloud')"
            " on conflict (name) do nothing"
        )
    stop = asyncio.Event()
    d = dispatch.Dispatcher(db, concurrency=64, batch=50, tenant_cap=None)
    d.registry.register("stamp", _stamp)
    d.retention_every = 1e9  # no retention pass in the measurement
    runner = asyncio.create_task(d.run_forever(url, stop=stop, sweep_interval=1.0))
    await asyncio.sleep(0.5)
    chain = [{"key": f"c{i}", "action": "stamp", "depends_on": [f"c{i - 1}"] if i else []}
             for i in range(length)]  # fmt: skip
    ids = []
    for _ in range(jobs):
        async with db.service() as s:
            ids.append((await s.job_create(tenant_id=TENANT, todos=chain)).id)
        await asyncio.sleep(0.01)
    for _ in range(600):
        async with db.service() as s:
            cur = await s.conn.execute(
                "select count(*) as n from public.jobs where id = any(%s) and status <> 'done'",
                (ids,),
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
            " join public.todos p on p.id = e.depends_on_id where c.job_id = any(%s)",
            (ids,),
        )
        rows = await cur.fetchall()
    await db.close()
    return [float(r["ms"]) for r in rows]


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=100_000, help="finished jobs of 10 ToDos")
    ap.add_argument("--future", type=int, default=1_000_000, help="future-dated ToDos")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--posts", type=int, default=200)
    ap.add_argument("--supabase-dir", type=Path, default=None)
    args = ap.parse_args()
    srv, stop = server()
    admin_user = str(conninfo_to_dict(srv.admin_url)["user"])
    names = {"fresh": make_db(srv, args.supabase_dir), "big": make_db(srv, args.supabase_dir)}
    urls = {k: srv.url(v) for k, v in names.items()}
    for url in urls.values():
        member(url)
    print(f"building: {args.jobs:,} finished jobs, {args.future:,} future ToDos", flush=True)
    built = growth_data.build(
        srv.url(names["big"], user=admin_user),
        jobs=args.jobs,
        start=datetime.now(UTC) - timedelta(days=27),
        span=timedelta(days=26),
        future_todos=args.future,
    )
    with psycopg.connect(urls["big"]) as conn:
        size = conn.execute(
            "select pg_size_pretty(pg_database_size(current_database()))"
        ).fetchone()
        counts = conn.execute(
            "select (select count(*) from public.todos) as todos,"
            " (select count(*) from public.job_events) as events"
        ).fetchone()
    print(f"built in {built:.0f} s: {counts}, {size}", flush=True)
    env = {**os.environ, "SUPABASE_JWT_SECRET": SECRET, "CPA_RATE_LIMIT": "1000000000",
           "SUPABASE_URL": ISSUER.removesuffix("/auth/v1")}  # fmt: skip
    apis = {}
    for key, url in urls.items():
        port = free_port()
        apis[key] = (
            start([sys.executable, "-m", "uvicorn", "cpa_scheduler.api:app", "--port", str(port),
                   "--log-level", "warning", "--no-access-log"],
                  {**env, "DATABASE_URL": url}, f"http://127.0.0.1:{port}"),
            f"http://127.0.0.1:{port}/v1/jobs",
        )  # fmt: skip
    headers = {"Authorization": f"Bearer {auth.mint(SECRET, USER, issuer=ISSUER)}"}
    figures: dict[str, dict[str, list[float]]] = {"fresh": {}, "big": {}}

    def record(which: str, key: str, value: float) -> None:
        figures[which].setdefault(key, []).append(value)
        print(f"  {which}: {key}: {value:.2f}", flush=True)

    try:
        for rep in range(args.repeats):
            print(f"repeat {rep + 1}/{args.repeats}", flush=True)
            order = ["fresh", "big"] if rep % 2 == 0 else ["big", "fresh"]
            for which in order:
                url = urls[which]
                record(which, "empty claim: database CPU us", empty_claim_us(url))
                lat, cpu = agent_claim_ms(url)
                record(which, "desktop agent claim: database CPU us", cpu)
                record(which, "desktop agent claim p50 ms", pct(lat, 50))
                cpu0 = db_cpu_seconds(srv.admin_url)
                lat = await single_client(apis[which][1], {"graph": GRAPH}, headers, args.posts)
                record(which, "db cpu us/POST",
                       (db_cpu_seconds(srv.admin_url) - cpu0) / (args.posts + 20) * 1e6)  # fmt: skip
                record(which, "POST /v1/jobs p50 ms", pct(lat, 50))
                record(which, "POST /v1/jobs p99 ms", pct(lat, 99))
                for key, value in (await drain(url, srv.admin_url)).items():
                    record(which, f"drain {key}", value)
                lat = await latency(url)
                record(which, "dependency -> dependent p50 ms", pct(lat, 50))
                record(which, "dependency -> dependent p99 ms", pct(lat, 99))
    finally:
        for proc, _ in apis.values():
            proc.terminate()
            proc.wait(30)
        for name in names.values():
            srv.drop_db(name)
        stop()
    print(f"\nmachine: {platform.node()} {platform.machine()} {os.cpu_count()} cores, "
          f"Python {platform.python_version()}; {args.repeats} interleaved repeats; big: "
          f"{counts[0]:,} ToDos ({args.future:,} of them future), {counts[1]:,} events, {size}")  # fmt: skip
    print("| figure | fresh (median) | big (median) | big / fresh | big / fresh per repeat |")
    print("|---|---|---|---|---|")
    for key in figures["fresh"]:
        f, b = figures["fresh"][key], figures["big"][key]
        per = ", ".join(f"{y / x:.2f}" if x else "-" for x, y in zip(f, b, strict=True))
        ratio = statistics.median(b) / statistics.median(f) if statistics.median(f) else 0.0
        print(f"| {key} | {statistics.median(f):.2f} | {statistics.median(b):.2f} | "
              f"{ratio:.2f} | {per} |")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
