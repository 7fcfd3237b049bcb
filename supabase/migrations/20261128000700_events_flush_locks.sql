-- The events flush takes its bucket locks in one statement (issue 15).
--
-- private.job_events_flush_v3 locked the transaction's job buckets in a plpgsql loop, one
-- PERFORM per bucket: ~44 us each. A drain of 100 chains commits ~50 jobs per transaction, and
-- profile_drain counted 9,968 such statements per 10,000 ToDos, 435 ms of 4,304 ms. _v4 takes
-- the same locks (class 7263200, hashtext(job_id) & 1023, ascending) in one statement: the
-- target list is evaluated above the Sort, so in key order, and PERFORM runs it to its end.
-- Everything else is _v3's.

create function private.job_events_flush_v4()
returns trigger
language plpgsql security definer set search_path = ''
as $$
declare
  v_tx constant xid8 := pg_current_xact_id();
  v_jobs uuid[];
  v_gone uuid[];
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
  -- A job deleted in this transaction takes its staged events with it (as in _v2).
  select array_agg(j.id) into v_gone
    from unnest(v_jobs) j(id)
   where not exists (select 1 from public.jobs x where x.id = j.id);
  -- One lock per bucket of jobs, in ascending order, at most 1024 (as in _v2).
  perform pg_advisory_xact_lock(7263200, b.key)
     from (select distinct hashtext(j.id::text) & 1023 as key
             from unnest(v_jobs) j(id)
            where v_gone is null or j.id <> all(v_gone)) b
    order by b.key;

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
  ), whole as (
    -- Usually a tenant's events fit one message: one aggregate, no per-event size and no
    -- window. Only a tenant whose events pass 100 kB is cut by size, as in _v2 (an event
    -- starts a new message once the events before it reach another 100 kB).
    select t.tenant_id, jsonb_agg(t.event order by t.id) as events
      from item t group by t.tenant_id
  ), msg as (
    select w.tenant_id, 0::bigint as chunk, w.events
      from whole w where pg_column_size(w.events) <= 100000
    union all
    select c.tenant_id, c.chunk, jsonb_agg(c.event order by c.id)
    from (
      select t.tenant_id, t.id, t.event,
             coalesce(sum(pg_column_size(t.event)) over (
               partition by t.tenant_id order by t.id
               rows between unbounded preceding and 1 preceding), 0) / 100000 as chunk
      from item t
     where t.tenant_id in (select w.tenant_id from whole w where pg_column_size(w.events) > 100000)
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
comment on function private.job_events_flush_v4 is 'At commit: lock the transaction''s job buckets (advisory, sorted, at most 1024, in one statement), give its staged events their ids in job_events, and broadcast them once per tenant (cut by size only past 100 kB).';
revoke execute on function private.job_events_flush_v4() from public, anon, authenticated, service_role;
-- As _v3 since 20261128000400: the flush's statements are planned once, not at every commit.
alter function private.job_events_flush_v4() set plan_cache_mode = force_generic_plan;

drop trigger job_events_flush on private.job_events_flush;
create constraint trigger job_events_flush
  after insert on private.job_events_flush
  deferrable initially deferred
  for each row execute function private.job_events_flush_v4();
