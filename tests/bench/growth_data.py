"""Set-based history for the growth and retention benchmarks: finished jobs of 10-ToDo chains
with their edges, events and audit entries, and future-dated ToDos (reminders next year).

Everything is written with INSERT ... SELECT as the superuser with
``session_replication_role = replica`` (no triggers: no events staged, no invariant checks, no
foreign-key checks), ~100,000 ToDos per second on the 2-core machine of tests/bench/RESULTS.md.
Per job: 10 ToDos, 9 edges, 42 events (4 per ToDo, 2 for the job), 3 audit entries, as a
dispatched no-op chain leaves them.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta

import psycopg

CHUNK = 10_000  # jobs per statement

TENANTS = """
insert into public.tenants (id, name)
select md5('tenant' || g)::uuid, 'growth ' || g from generate_series(0, %(tenants)s::int - 1) g
on conflict (id) do nothing
"""

# %(first)s..%(last)s: job numbers; a job's time is spread evenly over [start, start + span).
JOBS = """
insert into public.jobs (id, tenant_id, request, intent, status, todo_count, todos_done,
                         created_at, started_at, completed_at)
select md5('j' || g)::uuid, md5('tenant' || g %% %(tenants)s::int)::uuid, 'history', 'explicit',
       'done', 10, 10, t.ts, t.ts, t.ts + interval '3 s'
  from generate_series(%(first)s::int, %(last)s::int) g
 cross join lateral (select %(start)s::timestamptz
                            + (g - %(base)s::int)::float8 / %(count)s::int * %(span)s::interval as ts) t
"""

TODOS = """
insert into public.todos (id, job_id, tenant_id, key, position, action, target, status, attempts,
                          run_after, created_at, started_at, finished_at, updated_at, result)
select md5('t' || g || ':' || k)::uuid, md5('j' || g)::uuid, md5('tenant' || g %% %(tenants)s::int)::uuid,
       'k' || k, k, 'noop', 'cloud', 'done', 1, t.ts, t.ts, t.ts + k * interval '0.3 s',
       t.ts + k * interval '0.3 s' + interval '1 ms', t.ts + k * interval '0.3 s', '{}'::jsonb
  from generate_series(%(first)s::int, %(last)s::int) g
 cross join generate_series(0, 9) k
 cross join lateral (select %(start)s::timestamptz
                            + (g - %(base)s::int)::float8 / %(count)s::int * %(span)s::interval as ts) t
"""

EDGES = """
insert into public.todo_edges (todo_id, depends_on_id, tenant_id)
select md5('t' || g || ':' || k)::uuid, md5('t' || g || ':' || (k - 1))::uuid,
       md5('tenant' || g %% %(tenants)s::int)::uuid
  from generate_series(%(first)s::int, %(last)s::int) g cross join generate_series(1, 9) k
"""

EVENTS = """
insert into public.job_events (tenant_id, job_id, todo_id, kind, status, data, created_at)
select md5('tenant' || g %% %(tenants)s::int)::uuid, md5('j' || g)::uuid,
       case when k < 10 then md5('t' || g || ':' || k)::uuid end,
       case when k < 10 then 'todo.status' else 'job.status' end,
       (array['ready', 'running', 'done', 'done'])[s],
       case when s = 4 and k < 10 then '{"result": {}}'::jsonb else '{}'::jsonb end,
       t.ts + least(k, 9) * interval '0.3 s' + s * interval '1 ms'
  from generate_series(%(first)s::int, %(last)s::int) g
 cross join generate_series(0, 10) k
 cross join generate_series(1, 4) s
 cross join lateral (select %(start)s::timestamptz
                            + (g - %(base)s::int)::float8 / %(count)s::int * %(span)s::interval as ts) t
 where k < 10 or s <= 2
 order by 7
"""

AUDIT = """
insert into public.audit_log (tenant_id, actor_role, action, entity, entity_id, before, after,
                              created_at)
select md5('tenant' || g %% %(tenants)s::int)::uuid, 'service_role',
       case when a = 1 then 'INSERT' else 'UPDATE' end, 'jobs', md5('j' || g)::text,
       case when a > 1 then '{"status": "running"}'::jsonb end,
       jsonb_build_object('status', (array['pending', 'running', 'done'])[a]),
       t.ts + a * interval '1 s'
  from generate_series(%(first)s::int, %(last)s::int) g
 cross join generate_series(1, 3) a
 cross join lateral (select %(start)s::timestamptz
                            + (g - %(base)s::int)::float8 / %(count)s::int * %(span)s::interval as ts) t
"""

# Reminders: ready ToDos due in 30 to 330 days, 10 per pending job, over %(tenants)s tenants.
FUTURE_JOBS = """
insert into public.jobs (id, tenant_id, request, intent, status, todo_count, created_at)
select md5('fj' || g)::uuid, md5('tenant' || g %% %(tenants)s::int)::uuid, 'reminder', 'reminder',
       'pending', 10, now()
  from generate_series(%(first)s::int, %(last)s::int) g
"""

FUTURE_TODOS = """
insert into public.todos (id, job_id, tenant_id, key, position, action, target, status,
                          run_after, run_at, created_at, updated_at)
select md5('ft' || g || ':' || k)::uuid, md5('fj' || g)::uuid,
       md5('tenant' || g %% %(tenants)s::int)::uuid, 'r' || k, k, 'noop', 'cloud', 'ready', t.at,
       t.at, now(), now()
  from generate_series(%(first)s::int, %(last)s::int) g
 cross join generate_series(0, 9) k
 cross join lateral (select now() + interval '30 days'
                            + ((g * 10 + k) %% 300000) * interval '1 minute 26.4 s' as at) t
"""

# Where the schema has it (issue 24), the flag the park trigger would have set.
PARK = """
do $$
begin
  if exists (select 1 from pg_attribute where attrelid = 'public.todos'::regclass
                and attname = 'parked') then
    update public.todos set parked = true where status = 'ready' and run_after > now();
  end if;
end;
$$
"""


def _partitioned(conn: psycopg.Connection[object]) -> bool:
    row = conn.execute(
        "select exists (select 1 from pg_proc where proname = 'partition_create_v1') as p"
    ).fetchone()
    return bool(row and row[0])


def daily_partitions(conn: psycopg.Connection[object], start: datetime, days: int) -> None:
    """Retire the (empty) legacy partitions and create the dated ones a month of running would
    have left: one per day from ``start``, one per month for audit_log, then the ones ahead."""
    for table in ("job_events", "audit_log"):
        conn.execute(f"alter table public.{table} detach partition private.{table}_legacy")
        conn.execute(f"drop table private.{table}_legacy")
    day = start.replace(hour=0, minute=0, second=0, microsecond=0)
    for i in range(days):
        lo = day + timedelta(days=i)
        conn.execute(
            "select private.partition_create_v1('public.job_events', %s, %s, %s)",
            (f"job_events_p{lo:%Y%m%d}", lo, lo + timedelta(days=1)),
        )
    month = day.replace(day=1)
    while month < datetime.now(month.tzinfo):
        nxt = (month + timedelta(days=32)).replace(day=1)
        conn.execute(
            "select private.partition_create_v1('public.audit_log', %s, %s, %s)",
            (f"audit_log_p{month:%Y%m}", month, nxt),
        )
        month = nxt
    conn.execute("select cpa.partitions_ensure_v1(7)")


def build(
    admin_url: str,
    *,
    jobs: int,
    start: datetime,
    span: timedelta,
    tenants: int = 50,
    future_todos: int = 0,
    future_tenants: int = 1000,
    partitions: bool = True,
    log: bool = True,
) -> float:
    """Write ``jobs`` finished jobs (10 ToDos each) spread over [start, start + span) and
    ``future_todos`` reminders; returns the seconds it took."""
    t0 = time.perf_counter()
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute("set session_replication_role = replica")
        conn.execute("set synchronous_commit = off")
        if partitions and _partitioned(conn):
            daily_partitions(conn, start, (span.days or 1) + 1)
        conn.execute(TENANTS, {"tenants": max(tenants, future_tenants)})
        base = {"tenants": tenants, "start": start, "span": span, "base": 0, "count": jobs}
        for first in range(0, jobs, CHUNK):
            p = {**base, "first": first, "last": min(first + CHUNK, jobs) - 1}
            for sql in (JOBS, TODOS, EDGES, EVENTS, AUDIT):
                conn.execute(sql, p)
            if log:
                print(f"  history: {p['last'] + 1:,} jobs", flush=True)
        for first in range(0, future_todos // 10, CHUNK):
            p = {"tenants": future_tenants, "first": first,
                 "last": min(first + CHUNK, future_todos // 10) - 1}  # fmt: skip
            conn.execute(FUTURE_JOBS, p)
            conn.execute(FUTURE_TODOS, p)
        conn.execute(PARK)
        conn.execute("set session_replication_role = origin")
        conn.execute("vacuum (analyze, freeze)")
        conn.execute("checkpoint")
    return time.perf_counter() - t0
