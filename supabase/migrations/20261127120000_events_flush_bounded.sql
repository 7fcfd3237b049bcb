-- The events flush, bounded and unforgeable (issue 15, review of 20261127110000_events_flush).
--
-- 1. The flush took one transaction advisory lock per job it flushed. Locks live in a shared
--    table sized max_locks_per_transaction x (max_connections + max_prepared_transactions); one
--    transaction touching ~100,000 jobs failed at COMMIT with "out of shared memory" on a
--    64 x 200 server, and a small hosted instance has far fewer slots. Now the lock is per
--    bucket of jobs (hashtext(job_id) & 1023), still taken in ascending order, so a flush takes
--    at most 1024 locks; two jobs sharing a bucket only serialise their flushes, and the
--    ordering argument is unchanged (a job's ids are taken only under its bucket's lock, held
--    to the commit). Jobs deleted in the same transaction take no lock.
-- 2. The restage trigger let an insert through when cpa.events_flushing was 'on', a custom
--    setting any session may set: such a writer kept its statement-time id (out of commit
--    order) and sent no broadcast. Now it must also be nested in a trigger (the flush's insert
--    is), which a client's own insert never is.
-- The triggers move to the _v2 functions; the _v1 functions stay (migrations are append-only).

-- The flush at commit -----------------------------------------------------------------------
create function private.job_events_flush_v2()
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

  -- One lock per bucket of jobs, in ascending order (see 20261127110000's header): ids of a
  -- job commit in order. At most 1024 locks however many jobs the transaction touched; jobs
  -- deleted in this transaction need none.
  for v_key in
    select distinct hashtext(j.id::text) & 1023
      from unnest(v_jobs) j(id)
     where v_gone is null or j.id <> all(v_gone)
     order by 1
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
comment on function private.job_events_flush_v2 is 'At commit: lock the transaction''s job buckets (advisory, sorted, at most 1024), give its staged events their ids in job_events, and broadcast them once per tenant.';
revoke execute on function private.job_events_flush_v2() from public, anon, authenticated, service_role;

drop trigger job_events_flush on private.job_events_flush;
create constraint trigger job_events_flush
  after insert on private.job_events_flush
  deferrable initially deferred
  for each row execute function private.job_events_flush_v2();

-- Every other writer of job_events goes through the stage -----------------------------------
create function private.job_events_restage_v2()
returns trigger
language plpgsql security definer set search_path = ''
as $$
begin
  -- The flush's own insert, and only that: it runs inside the flush trigger, so this trigger
  -- is nested (depth 2); a client that sets the flag itself inserts at depth 1 and is staged.
  if current_setting('cpa.events_flushing', true) = 'on' and pg_trigger_depth() > 1 then
    return null;
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
comment on function private.job_events_restage_v2 is 'Move rows inserted into job_events outside the flush (notes, notices, emits, and any insert that merely sets the flush flag) into the stage: they get their ids at commit.';
revoke execute on function private.job_events_restage_v2() from public, anon, authenticated, service_role;

drop trigger job_events_restage on public.job_events;
create trigger job_events_restage
  after insert on public.job_events
  referencing new table as new_rows
  for each statement execute function private.job_events_restage_v2();
