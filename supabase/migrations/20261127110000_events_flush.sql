-- Progress events are written at commit, in commit order per job, with one broadcast per
-- transaction and tenant (issue 15).
--
-- The gap this closes: event ids came from a sequence when the status triggers inserted the
-- rows, but became visible at commit. Two transactions writing events of the same job could
-- commit in the other order (a completion takes ids 100-101, then waits for the job row; a
-- claim of another ToDo of that job takes 102 and commits first), and a reader resuming by id
-- (SSE Last-Event-ID, ?after=, the client's gap fill) that saw 102 skipped 100-101 for good.
--
-- Now:
-- 1. Writers stage their events inside the transaction instead of inserting job_events rows:
--    the status triggers call private.job_events_stage_v1 (one staged row per statement, the
--    statement's events as an array); any other insert into public.job_events (an agent's note,
--    the desktop sweep's notice, an executor's emit, a service-role client) is moved into the
--    stage by the statement trigger job_events_restage, so that every writer, also one of
--    another branch's migration, is covered without redefining it.
-- 2. The first staging of a transaction inserts its marker row into private.job_events_flush;
--    the DEFERRABLE INITIALLY DEFERRED constraint trigger on that table fires once per
--    transaction, at commit, after every statement of the transaction (and so after every row
--    lock it takes).
-- 3. The flush (private.job_events_flush_v1) takes a transaction advisory lock per job
--    (pg_advisory_xact_lock(7263200, hashtext(job_id)), in ascending key order), then assigns
--    the ids (nextval, in staging order) and inserts the job_events rows, then sends one
--    Realtime broadcast per tenant with all of the transaction's events (cut into messages of
--    about 100 kB when larger; no longer at 50 events), and deletes its staged rows and marker.
--
-- Why ids of one job now commit in id order: a transaction takes ids for job J only while
-- holding J's advisory lock, and holds it until its commit is complete (transaction locks are
-- released after the commit is recorded and visible). Another transaction that wants ids for J
-- waits for the lock, so it takes larger ids and becomes visible later. A reader that sees
-- id n of J therefore already sees every smaller id of J that will ever exist (readers resume
-- per job: GET /v1/jobs/{id}/events).
--
-- Why this cannot deadlock: the flush runs at commit, after the transaction's last statement,
-- so it takes no row lock after its first advisory lock (the job_events insert has no foreign
-- key since 20261127000710 and its ids are unique, so it waits for no row; the staging tables
-- are private to the transaction; realtime.send only inserts). Every flush takes its advisory
-- locks in ascending key order, and only flushes take locks in this key space. A transaction
-- that waits in its flush waits for another flushing transaction, which waits (if at all)
-- only for a strictly larger key; a chain of such waits cannot close into a cycle, and a
-- transaction that is not yet flushing is never waited for by a flush. Rows locked earlier in
-- the transaction may block others, as before, but nothing those others hold blocks the flush
-- (it only reads public.jobs, without a lock, to drop events of a job deleted in the
-- transaction). The NOTIFY queue lock is taken at commit after the deferred triggers, so its
-- holder is past its flush and waits for no advisory lock. (An explicit SET CONSTRAINTS ...
-- IMMEDIATE would flush early and void this argument, and so would a deferrable foreign key
-- or another deferred trigger that locks rows; nothing here uses them.)
--
-- Cost: the ids of one job are serialized from flush to commit; transactions on different
-- jobs do not wait for each other (except on a 32-bit hash collision, which only serializes).
--
-- Supabase's transaction-mode pooler: no session state is used. The staging rows and the
-- marker are keyed by the transaction (pg_current_xact_id()) and deleted by the flush; a
-- rolled-back transaction's rows are invisible and vacuumed; both tables are UNLOGGED, so a
-- crash leaves nothing (unlogged tables are emptied in crash recovery). The flag that keeps
-- the flush's own insert from being restaged is a transaction-local setting.
--
-- What callers see: an insert into job_events (and cpa.todo_note_v1) still answers with an id,
-- but that id is provisional: the event gets its final id at commit. Nobody uses the answer.

-- The staged form of an event ---------------------------------------------------------------
create type private.job_event_draft as (
  tenant_id uuid,
  job_id uuid,
  todo_id uuid,
  kind text,
  status text,
  data jsonb,
  created_at timestamptz
);
comment on type private.job_event_draft is 'An event staged in its transaction; it becomes a job_events row (with its id) at commit.';

-- Staged events: one row per writing statement ----------------------------------------------
create unlogged table private.job_events_staged (
  txid xid8 not null default pg_current_xact_id(),
  seq bigint generated always as identity,
  events private.job_event_draft[] not null
);
comment on table private.job_events_staged is 'Events staged by the transaction txid, in order (seq, then array order); private.job_events_flush_v1 moves them to job_events at commit. Unlogged: empty after a crash.';
-- A statement's events are usually larger than 2 kB: kept out of line but not compressed
-- (they live until the commit; compressing them cost more than it saved).
alter table private.job_events_staged alter column events set storage external;
create index job_events_staged_txid_idx on private.job_events_staged (txid, seq);
revoke all on private.job_events_staged from public, anon, authenticated, service_role;
alter table private.job_events_staged enable row level security;
-- No policies: only the owner (the security definer functions below) reads or writes it.

-- One marker row per transaction arms the deferred flush -------------------------------------
create unlogged table private.job_events_flush (
  txid xid8 primary key default pg_current_xact_id()
);
comment on table private.job_events_flush is 'One row per transaction with staged events; its deferred constraint trigger flushes them at commit. Unlogged: empty after a crash.';
revoke all on private.job_events_flush from public, anon, authenticated, service_role;
alter table private.job_events_flush enable row level security;
-- No policies: only the owner (the security definer functions below) reads or writes it.

-- Stage events ------------------------------------------------------------------------------
create function private.job_events_stage_v1(p_events private.job_event_draft[])
returns void
language plpgsql security definer set search_path = ''
as $$
begin
  if coalesce(cardinality(p_events), 0) = 0 then
    return;
  end if;
  insert into private.job_events_staged (events) values (p_events);
  insert into private.job_events_flush (txid) values (pg_current_xact_id())
  on conflict (txid) do nothing;
end;
$$;
comment on function private.job_events_stage_v1 is 'Stage events in the current transaction and arm its flush at commit.';
revoke execute on function private.job_events_stage_v1(private.job_event_draft[]) from public, anon, authenticated, service_role;

-- The flush at commit -----------------------------------------------------------------------
create function private.job_events_flush_v1()
returns trigger
language plpgsql security definer set search_path = ''
as $$
declare
  v_tx constant xid8 := pg_current_xact_id();
  v_jobs uuid[];
  v_gone uuid[];
  v_key integer;
  v_topics text[];
  v_payloads jsonb[];
begin
  delete from private.job_events_flush f where f.txid = v_tx;
  select array_agg(distinct u.job_id) into v_jobs
    from private.job_events_staged s cross join lateral unnest(s.events) u
   where s.txid = v_tx;
  if v_jobs is null then
    return null;
  end if;
  -- A job deleted in this transaction takes its staged events with it, as the jobs_delete_events
  -- trigger takes the committed ones: one probe per job, without a lock.
  select array_agg(j.id) into v_gone
    from unnest(v_jobs) j(id)
   where not exists (select 1 from public.jobs x where x.id = j.id);

  -- One lock per job, in ascending key order (see the header): ids of a job commit in order.
  for v_key in
    select distinct hashtext(j.id::text) from unnest(v_jobs) j(id) order by 1
  loop
    perform pg_advisory_xact_lock(7263200, v_key);
  end loop;

  perform set_config('cpa.events_flushing', 'on', true);
  with gone as (
    delete from private.job_events_staged s where s.txid = v_tx returning s.seq, s.events
  ), ins as (
    insert into public.job_events (tenant_id, job_id, todo_id, kind, status, data, created_at)
    select e.tenant_id, e.job_id, e.todo_id, e.kind, e.status, coalesce(e.data, '{}'::jsonb),
           coalesce(e.created_at, now())
      from gone g
      cross join lateral unnest(g.events) with ordinality
           as e(tenant_id, job_id, todo_id, kind, status, data, created_at, ord)
     where v_gone is null or e.job_id <> all(v_gone)
     order by g.seq, e.ord
    returning *
  ), item as (
    select i.tenant_id, i.id,
           jsonb_build_object('id', i.id, 'job_id', i.job_id, 'todo_id', i.todo_id,
                              'kind', i.kind, 'status', i.status, 'data', i.data,
                              'created_at', i.created_at) as event
      from ins i
  ), msg as (
    -- The Free plan caps a broadcast at 256 KB. Messages are cut by size, not by count (the
    -- 50 events of 20261127000300_events_contract made a 128-ToDo claim three messages): an
    -- event starts a new message once the events before it in the transaction reach
    -- another 100 kB, so a message holds at most 100 kB plus one event (one huge result can
    -- still make a message large, as before).
    select c.tenant_id, c.chunk, jsonb_agg(c.event order by c.id) as events
    from (
      select t.tenant_id, t.id, t.event,
             coalesce(sum(pg_column_size(t.event)) over (
               partition by t.tenant_id order by t.id
               rows between unbounded preceding and 1 preceding), 0) / 100000 as chunk
      from item t
    ) c
    group by c.tenant_id, c.chunk
  )
  select array_agg('tenant:' || m.tenant_id::text order by m.tenant_id, m.chunk),
         array_agg(jsonb_build_object('events', m.events) order by m.tenant_id, m.chunk)
    into v_topics, v_payloads
    from msg m;
  perform set_config('cpa.events_flushing', 'off', true);

  for i in 1 .. coalesce(cardinality(v_topics), 0) loop
    perform realtime.send(v_payloads[i], 'job_events', v_topics[i], true);
  end loop;
  return null;
end;
$$;
comment on function private.job_events_flush_v1 is 'At commit: lock the transaction''s jobs (advisory, sorted), give its staged events their ids in job_events, and broadcast them once per tenant.';
revoke execute on function private.job_events_flush_v1() from public, anon, authenticated, service_role;

create constraint trigger job_events_flush
  after insert on private.job_events_flush
  deferrable initially deferred
  for each row execute function private.job_events_flush_v1();

-- Every other writer of job_events goes through the stage too -------------------------------
create function private.job_events_restage_v1()
returns trigger
language plpgsql security definer set search_path = ''
as $$
begin
  if current_setting('cpa.events_flushing', true) = 'on' then
    return null;  -- the flush's own insert
  end if;
  if not exists (select 1 from new_rows) then
    return null;
  end if;
  perform private.job_events_stage_v1(array(
    select row(n.tenant_id, n.job_id, n.todo_id, n.kind, n.status, n.data,
               n.created_at)::private.job_event_draft
      from new_rows n order by n.id));
  delete from public.job_events e using new_rows n where e.id = n.id;
  return null;
end;
$$;
comment on function private.job_events_restage_v1 is 'Move rows inserted into job_events outside the flush (notes, notices, emits) into the stage: they get their ids at commit.';
revoke execute on function private.job_events_restage_v1() from public, anon, authenticated, service_role;

drop trigger job_events_broadcast on public.job_events;
drop function private.job_events_broadcast_v1();

create trigger job_events_restage
  after insert on public.job_events
  referencing new table as new_rows
  for each statement execute function private.job_events_restage_v1();

-- The status triggers stage instead of inserting --------------------------------------------
-- Same events, same order, same early returns as 20261127000700_events_skip_empty.
create or replace function private.todos_events_v1()
returns trigger
language plpgsql security definer set search_path = ''
as $$
begin
  if not exists (select 1 from new_rows) then
    return null;
  end if;
  if tg_op = 'INSERT' then
    perform private.job_events_stage_v1(array(
      select row(n.tenant_id, n.job_id, n.id, 'todo.status', n.status,
                 jsonb_build_object('key', n.key, 'action', n.action, 'target', n.target),
                 now())::private.job_event_draft
        from new_rows n order by n.id));
    if exists (select 1 from new_rows where status = 'ready') then
      perform pg_notify('cpa_todo_ready', 'insert');
    end if;
  else
    perform private.job_events_stage_v1(array(
      select row(n.tenant_id, n.job_id, n.id, 'todo.status', n.status,
                 jsonb_strip_nulls(jsonb_build_object(
                   'key', n.key, 'action', n.action, 'target', n.target, 'attempts', n.attempts,
                   'error', n.error,
                   'result', case when n.status = 'done' then n.result end)),
                 now())::private.job_event_draft
        from new_rows n join old_rows o on o.id = n.id
       where n.status is distinct from o.status
       order by n.id));
    if exists (select 1 from new_rows n join old_rows o on o.id = n.id
               where n.status = 'ready' and o.status is distinct from 'ready') then
      perform pg_notify('cpa_todo_ready', 'update');
    end if;
  end if;
  return null;
end;
$$;
revoke execute on function private.todos_events_v1() from public, anon, authenticated, service_role;

create or replace function private.jobs_events_v1()
returns trigger
language plpgsql security definer set search_path = ''
as $$
begin
  if not exists (select 1 from new_rows) then
    return null;
  end if;
  if tg_op = 'INSERT' then
    perform private.job_events_stage_v1(array(
      select row(n.tenant_id, n.id, null, 'job.status', n.status,
                 jsonb_build_object('intent', n.intent), now())::private.job_event_draft
        from new_rows n order by n.id));
  else
    -- A completion updates its job's todos_done on every flush; the status changes only at
    -- the end: check first (job statements touch a few rows).
    if not exists (select 1 from new_rows n join old_rows o on o.id = n.id
                   where n.status is distinct from o.status) then
      return null;
    end if;
    perform private.job_events_stage_v1(array(
      select row(n.tenant_id, n.id, null, 'job.status', n.status,
                 jsonb_strip_nulls(jsonb_build_object('error', n.error, 'todos_done', n.todos_done,
                                                      'todo_count', n.todo_count)),
                 now())::private.job_event_draft
        from new_rows n join old_rows o on o.id = n.id
       where n.status is distinct from o.status
       order by n.id));
  end if;
  return null;
end;
$$;
revoke execute on function private.jobs_events_v1() from public, anon, authenticated, service_role;
