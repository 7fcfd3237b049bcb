-- Claims that probe by key, complete and claim in one call, and a cheaper events flush (issue
-- 15, the no-op drain).
--
-- Claim v3: v2 with plans that probe by primary key ----------------------------------------
-- private.todo_claim_pick_v1 is v2's claim without starting the jobs; cpa.todo_claim_v3
-- starts them after it, as v2 did (SKIP LOCKED). v2's plans scanned the whole todos table per claim: the update joined the picked ids to
-- todos by a hash join over a sequential scan (3 ms per claim at 10,000 ToDos, growing with
-- the table and its dead rows), and the pending-job check joined every pending job to every
-- claimed row. v3 updates `id = any(array(picked))` and looks up only the claimed ToDos'
-- jobs, and plans with random_page_cost = 1.1 (the rows it touches are few and hot, so an
-- index probe is always the cheaper access; the default 4 made the planner prefer sequential
-- scans of a small table). Same rows, locks, fairness and tenant cap as v2; v2 stays.
create function private.todo_claim_pick_v1(
  p_target text,
  p_owner text,
  p_limit integer,
  p_lease_seconds double precision default 60,
  p_tenant_id uuid default null,
  p_actions text[] default null,
  p_tenant_cap integer default null
) returns setof public.todos
language plpgsql security definer set search_path = '' set random_page_cost = 1.1
as $$
declare
  v_tenants uuid[];
  v_share integer;
begin
  perform private.todo_expire_v1(100);
  if p_tenant_id is not null then
    v_tenants := array[p_tenant_id];
  else
    with recursive active(tenant_id) as (
      (select t.tenant_id from public.todos t
        where t.status = 'ready' and t.target = p_target
        order by t.tenant_id limit 1)
      union all
      select (select t.tenant_id from public.todos t
               where t.status = 'ready' and t.target = p_target and t.tenant_id > a.tenant_id
               order by t.tenant_id limit 1)
        from active a where a.tenant_id is not null
    )
    select array_agg(a.tenant_id) into v_tenants from active a where a.tenant_id is not null;
  end if;
  if v_tenants is null then
    return;
  end if;
  v_share := greatest(1, ceil(p_limit::numeric / array_length(v_tenants, 1))::integer);
  if p_tenant_cap is not null then
    -- Two claimers counting a tenant's running ToDos at once would both see room: claims of
    -- one tenant take turns on a transaction lock (a claim holds it for milliseconds), in
    -- tenant order so claimers of several tenants cannot deadlock. Taken in its own
    -- statement, so the count below sees every claim committed before the lock was granted.
    -- (Skipping a locked tenant instead would let a concurrent claimer come back empty and
    -- end its pass while the tenant still has ready work.)
    perform pg_advisory_xact_lock(7263100, hashtext(a.tenant_id::text || ':' || p_target))
       from unnest(v_tenants) as a(tenant_id)
      order by a.tenant_id;
  end if;

  return query
  with picked as materialized (
    select c.id
      from unnest(v_tenants) as a(tenant_id)
      cross join lateral (
        select case when p_tenant_cap is null then v_share
                    else least(v_share, greatest(0, p_tenant_cap - (
                           select count(*) from public.todos r
                            where r.tenant_id = a.tenant_id and r.target = p_target
                              and r.status = 'running')))::integer
               end as n
      ) room
      cross join lateral (
        select t.id from public.todos t
         where t.status = 'ready' and t.target = p_target and t.tenant_id = a.tenant_id
           and t.run_after <= now()
           and (p_actions is null or t.action = any(p_actions))
           and (t.assigned_agent is null or 'agent:' || t.assigned_agent = p_owner)
         order by t.priority desc, t.run_after
         limit room.n
         for update skip locked
      ) c
     limit p_limit
  ), claimed as (
    update public.todos t
       set status = 'running', attempts = t.attempts + 1, lease_owner = p_owner,
           lease_expires_at = now() + make_interval(secs => least(p_lease_seconds, 3600)),
           started_at = coalesce(t.started_at, now()), updated_at = now()
     where t.id = any(array(select p.id from picked p))
    returning t.*
  )
  select * from claimed;
end;
$$;
comment on function private.todo_claim_pick_v1 is 'The claim of todo_claim_v2 without starting the jobs: expired leases first, fair across tenants, at most p_tenant_cap running per tenant, FOR UPDATE SKIP LOCKED; the caller starts the claimed ToDos'' pending jobs.';
revoke execute on function
  private.todo_claim_pick_v1(text, text, integer, double precision, uuid, text[], integer)
  from public, anon, authenticated, service_role;

create function cpa.todo_claim_v3(
  p_target text,
  p_owner text,
  p_limit integer,
  p_lease_seconds double precision default 60,
  p_tenant_id uuid default null,
  p_actions text[] default null,
  p_tenant_cap integer default null
) returns setof public.todos
language plpgsql security definer set search_path = '' set random_page_cost = 1.1
as $$
declare
  v_rows public.todos[];
begin
  select array_agg(c) into v_rows
    from private.todo_claim_pick_v1(p_target, p_owner, p_limit, p_lease_seconds, p_tenant_id,
                                    p_actions, p_tenant_cap) c;
  if v_rows is null then
    return;
  end if;
  -- As v2: a pending job of a claimed ToDo starts; one locked elsewhere is left to a later
  -- claim (SKIP LOCKED: a claim never waits for a job row).
  update public.jobs j
     set status = 'running', started_at = coalesce(j.started_at, now())
   where j.id in (select p.id from public.jobs p
                   where p.id = any(array(select distinct r.job_id from unnest(v_rows) r))
                     and p.status = 'pending'
                     for update skip locked);
  return query select * from unnest(v_rows);
end;
$$;
comment on function cpa.todo_claim_v3 is 'Claim up to p_limit ready ToDos of a target (FOR UPDATE SKIP LOCKED), fair across tenants and at most p_tenant_cap running per tenant, leased to p_owner; reclaims expired leases first. As v2, with index plans.';
revoke execute on function
  cpa.todo_claim_v3(text, text, integer, double precision, uuid, text[], integer)
  from public, anon, authenticated;
grant execute on function
  cpa.todo_claim_v3(text, text, integer, double precision, uuid, text[], integer)
  to service_role;

-- Complete and claim in one call ----------------------------------------------------------
-- A dispatcher lane alternated two transactions: a claim, then a completion of what the claim
-- ran. Each commit also runs the events flush (advisory lock, job_events insert, one
-- realtime.send per tenant), so a drain paid two flushes and two commits per batch.
-- cpa.todo_complete_claim_v1 completes the finished batch and claims the next one in one
-- transaction: one commit, one flush.
--
-- Order inside the call:
-- 1. the completions (as cpa.todo_complete_v1: fenced by lease owner and attempt) and the
--    release of their dependents, so the claim below can take a dependent released here;
-- 2. the claim, private.todo_claim_pick_v1 (expired leases, fairness, tenant cap, SKIP
--    LOCKED), as cpa.todo_claim_v3 makes it;
-- 3. last, the job rows, all in one pass in id order: the claimed ToDos' pending jobs start,
--    the completed ToDos' jobs count them (and finish). The job rows are locked only now, so a
--    lane does not hold its jobs' rows while it claims and the other lanes' calls on the same
--    jobs are not serialised behind the claim. The counts come from the completing update
--    itself, not from a re-read of the done rows.
-- Lock order is the one cpa.todo_complete_v1 uses (ToDo rows, then job rows in id order); the
-- claim's ToDo locks are SKIP LOCKED and never wait. A started job is waited for here instead
-- of skipped: only in id order with the rest, so the call cannot deadlock on job rows.
--
-- Every row is (done, todo): done is the number of ToDos completed by this call, todo a
-- claimed ToDo, or null in the single row of a call that claimed nothing.

create function cpa.todo_complete_claim_v1(
  p_items jsonb,
  p_target text,
  p_owner text,
  p_limit integer,
  p_lease_seconds double precision default 60,
  p_tenant_id uuid default null,
  p_actions text[] default null,
  p_tenant_cap integer default null
) returns table (done integer, todo public.todos)
language plpgsql security definer set search_path = '' set random_page_cost = 1.1
as $$
declare
  v_done uuid[];
  v_jobs uuid[];
  v_n integer := 0;
  v_rows public.todos[];
  v_start uuid[] := '{}';
begin
  with items as (
    select (i ->> 'id')::uuid as id, i ->> 'owner' as owner, (i ->> 'attempt')::integer as attempt,
           i -> 'result' as result
      from jsonb_array_elements(coalesce(p_items, '[]'::jsonb)) as i
  ), upd as (
    update public.todos t
       set status = 'done', result = items.result, error = null, finished_at = now(),
           updated_at = now(), lease_owner = null, lease_expires_at = null
      from items
     where t.id = items.id and t.status = 'running'
       and t.lease_owner = items.owner
       and t.attempts = coalesce(items.attempt, t.attempts)
    returning t.id, t.job_id
  )
  select array_agg(upd.id), array_agg(upd.job_id) into v_done, v_jobs from upd;

  if v_done is not null then
    v_n := cardinality(v_done);
    perform 1 from public.todos c
     where c.id in (select e.todo_id from public.todo_edges e where e.depends_on_id = any(v_done))
       and c.status = 'waiting'
     order by c.id for no key update;
    with rel as (
      select e.todo_id, count(*)::integer as n
        from public.todo_edges e where e.depends_on_id = any(v_done)
       group by e.todo_id
    )
    update public.todos c
       set deps_remaining = c.deps_remaining - rel.n,
           status = case when c.deps_remaining - rel.n > 0 then c.status
                         when c.requires_confirmation and c.confirmed_at is null then 'confirming'
                         else 'ready' end,
           run_after = case when c.deps_remaining - rel.n > 0 then c.run_after
                            else greatest(c.run_after, now()) end,
           updated_at = now()
      from rel
     where c.id = rel.todo_id and c.status = 'waiting';
  end if;

  if p_limit > 0 then
    select array_agg(c) into v_rows
      from private.todo_claim_pick_v1(p_target, p_owner, p_limit, p_lease_seconds, p_tenant_id,
                                      p_actions, p_tenant_cap) c;
    v_start := array(select distinct r.job_id from unnest(v_rows) r);
  end if;

  -- Every job row this call changes, locked in one pass in id order: the jobs whose ToDos it
  -- completed and the pending jobs of the ToDos it claimed. (Locking the started jobs first,
  -- as the claim does with SKIP LOCKED, and the counted ones after, deadlocked two lanes.)
  if v_done is not null or cardinality(v_start) > 0 then
    perform 1 from public.jobs j
     where j.id = any(coalesce(v_jobs, '{}') || v_start)
       and (j.id = any(coalesce(v_jobs, '{}')) or j.status = 'pending')
     order by j.id for no key update;
  end if;
  if cardinality(v_start) > 0 then
    update public.jobs j
       set status = 'running', started_at = coalesce(j.started_at, now())
     where j.id = any(v_start) and j.status = 'pending';
  end if;
  if v_done is not null then
    with n as (
      select u.job_id, count(*)::integer as k from unnest(v_jobs) u(job_id) group by u.job_id
    )
    update public.jobs j
       set todos_done = j.todos_done + n.k,
           status = case when j.status = 'running' and j.todos_done + n.k >= j.todo_count then 'done'
                         else j.status end,
           completed_at = case when j.status = 'running' and j.todos_done + n.k >= j.todo_count
                               then now() else j.completed_at end
      from n
     where j.id = n.job_id;
  end if;

  if v_rows is null then
    return query select v_n, null::public.todos;
  else
    return query select v_n, r from unnest(v_rows) r;
  end if;
end;
$$;
comment on function cpa.todo_complete_claim_v1 is 'Complete a finished batch (as todo_complete_v1, releasing dependents), then claim the next one (as todo_claim_v3), then count the done ToDos on their jobs: one transaction, one events flush. Rows: (done, claimed ToDo or null).';
revoke execute on function
  cpa.todo_complete_claim_v1(jsonb, text, text, integer, double precision, uuid, text[], integer)
  from public, anon, authenticated;
grant execute on function
  cpa.todo_complete_claim_v1(jsonb, text, text, integer, double precision, uuid, text[], integer)
  to service_role;

-- The events flush, cheaper broadcast (issue 15) -------------------------------------------
-- _v2 measured every event (pg_column_size) and ran a window over the transaction's events to
-- cut its messages at ~100 kB, although a transaction's events nearly always fit one message.
-- _v3 aggregates a tenant's events once and cuts by size only when that aggregate passes
-- 100 kB (then exactly as _v2). Same rows, same ids, same locks, same messages below 100 kB.
-- Measured: a 256-event flush 4.9-5.5 ms -> 4.4-4.8 ms (pgbench, PG 15, interleaved).
create function private.job_events_flush_v3()
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
  -- A job deleted in this transaction takes its staged events with it (as in _v2).
  select array_agg(j.id) into v_gone
    from unnest(v_jobs) j(id)
   where not exists (select 1 from public.jobs x where x.id = j.id);
  -- One lock per bucket of jobs, in ascending order, at most 1024 (as in _v2).
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
comment on function private.job_events_flush_v3 is 'At commit: lock the transaction''s job buckets (advisory, sorted, at most 1024), give its staged events their ids in job_events, and broadcast them once per tenant (cut by size only past 100 kB).';
revoke execute on function private.job_events_flush_v3() from public, anon, authenticated, service_role;

drop trigger job_events_flush on private.job_events_flush;
create constraint trigger job_events_flush
  after insert on private.job_events_flush
  deferrable initially deferred
  for each row execute function private.job_events_flush_v3();
