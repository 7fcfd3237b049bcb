-- Future-dated ToDos off the claim path (issue 24).
--
-- A ToDo waiting for a time (a reminder's run_at, a retry's backoff, a wait timer) is `ready`
-- with run_after in the future. The claims walked todos_ready_idx (target, tenant_id,
-- priority desc, run_after) where status = 'ready': run_after comes after priority, so
-- `run_after <= now()` could not bound the scan, and a claim that found nothing due read every
-- future entry of the tenant (100,000 reminders: 112 buffers and 2.5x the database CPU of an
-- empty claim), and the tenant skip scan visited every tenant that had only future work.
--
-- Design: a `parked` flag, set by a row trigger whenever a ToDo becomes (or stays) ready with
-- run_after after the writing transaction's now(). The claims read a partial index of the
-- ready ToDos that are not parked (todos_due_idx), so future work is not in the structure they
-- scan at all; each claim first un-parks, in one probe of todos_parked_idx, the parked ToDos
-- that have come due (oldest first, SKIP LOCKED; the dispatcher's at most as many as it may
-- claim) and claims them in the same call, so they start when they did before.
-- Why not the other two shapes:
-- - an index the claim range-scans by due time keeps the priority order only with one probe
--   per priority, and the per-tenant fairness still needs one probe per tenant holding future
--   work: cost grows with tenants that have reminders;
-- - a separate status would change every function and reader that lists statuses (cancel,
--   retry, sweep, the API, the events); the flag changes nothing outside the claims: the
--   status stays `ready`, every writer keeps its SQL (the trigger sets the flag), and the
--   readers of `status = 'ready'` (metrics, the alarm, the sweep) keep their index,
--   todos_ready_run_after_idx.
-- A normal ToDo writes the same index entries as before (todos_due_idx instead of
-- todos_ready_idx); a timed one writes one more update when it comes due.

alter table public.todos add column parked boolean not null default false;
comment on column public.todos.parked is 'Ready but its run_after was in the future when it became ready; the claims leave it out (todos_due_idx) until one of them finds it due and clears the flag.';

create function private.todos_park_v1()
returns trigger
language plpgsql set search_path = ''
as $$
begin
  new.parked := new.run_after > now();
  return new;
end;
$$;
comment on function private.todos_park_v1 is 'A ToDo that is ready but not yet due is parked: the claims'' index leaves it out until a claim finds it due.';
revoke execute on function private.todos_park_v1() from public, anon, authenticated, service_role;

-- Named after todos_hold_until_run_at, so it runs after that trigger has raised run_after.
create trigger todos_park
  before insert or update of status, run_after, run_at on public.todos
  for each row when (new.status = 'ready')
  execute function private.todos_park_v1();

update public.todos set parked = true where status = 'ready' and run_after > now();

-- The claims: due ready ToDos per target and tenant, in priority order.
create index todos_due_idx on public.todos (target, tenant_id, priority desc, run_after)
  where status = 'ready' and not parked;
-- The claims' un-parking probe: parked ToDos per target by due time.
create index todos_parked_idx on public.todos (target, run_after)
  where status = 'ready' and parked;
drop index public.todos_ready_idx;

-- The claim ----------------------------------------------------------------------------------
-- Same signature, rows, locks, fairness and tenant cap as before; it reads todos_due_idx and
-- un-parks what has come due first. cpa.todo_claim_v3 and cpa.todo_complete_claim_v4 (and the
-- versions that run them) claim through it.
create or replace function private.todo_claim_pick_v1(
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
  v_due uuid[];
begin
  perform private.todo_expire_v1(100);
  -- Parked ToDos that have come due. The dispatcher's claims un-park at most as many as they
  -- may claim: a row un-parked here stays locked until commit, so a concurrent claim skips it,
  -- and one this call did not claim would wait for the next claim (no alarm points at a ToDo
  -- already due); a complete-and-claim with no free slot (p_limit 0) un-parks nothing. A
  -- tenant's claim (a desktop agent's) un-parks up to 1000 of every tenant's: no dispatcher
  -- claims desktop ToDos, and its own due ones may sit behind other tenants'. An empty probe
  -- reads one leaf of todos_parked_idx and writes nothing (an UPDATE of no rows would still
  -- run the todos statement triggers).
  if p_limit > 0 then
    v_due := array(select p.id from public.todos p
                    where p.status = 'ready' and p.parked and p.target = p_target
                      and p.run_after <= now()
                    order by p.run_after
                    limit case when p_tenant_id is null then p_limit else 1000 end
                    for update skip locked);
    if cardinality(v_due) > 0 then
      update public.todos t set parked = false where t.id = any(v_due);
    end if;
  end if;
  if p_tenant_id is not null then
    v_tenants := array[p_tenant_id];
  else
    with recursive active(tenant_id) as (
      (select t.tenant_id from public.todos t
        where t.status = 'ready' and not t.parked and t.target = p_target
        order by t.tenant_id limit 1)
      union all
      select (select t.tenant_id from public.todos t
               where t.status = 'ready' and not t.parked and t.target = p_target
                 and t.tenant_id > a.tenant_id
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
    -- As before: claims of one tenant take turns on a transaction lock, in tenant order.
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
        -- Not parked means due when written; run_after <= now() still holds back a row written
        -- by a transaction that started after this one.
        select t.id from public.todos t
         where t.status = 'ready' and not t.parked and t.target = p_target
           and t.tenant_id = a.tenant_id
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
comment on function private.todo_claim_pick_v1 is 'The claim of todo_claim_v2 without starting the jobs: expired leases first, parked ToDos that came due un-parked, fair across tenants, at most p_tenant_cap running per tenant, FOR UPDATE SKIP LOCKED; the caller starts the claimed ToDos'' pending jobs.';
revoke execute on function
  private.todo_claim_pick_v1(text, text, integer, double precision, uuid, text[], integer)
  from public, anon, authenticated, service_role;

-- v1 and v2 (the desktop agents' claims: agent_claim_v1 on v1, agent_claim_v2 on v2) scanned
-- todos_ready_idx with their own copy of the selection; they now run v3, the same claim.
create or replace function cpa.todo_claim_v2(
  p_target text,
  p_owner text,
  p_limit integer,
  p_lease_seconds double precision default 60,
  p_tenant_id uuid default null,
  p_actions text[] default null,
  p_tenant_cap integer default null
) returns setof public.todos
language sql security definer set search_path = ''
as $$
  select * from cpa.todo_claim_v3(p_target, p_owner, p_limit, p_lease_seconds, p_tenant_id,
                                  p_actions, p_tenant_cap)
$$;
comment on function cpa.todo_claim_v2 is 'Claim up to p_limit ready ToDos of a target (FOR UPDATE SKIP LOCKED), fair across tenants and at most p_tenant_cap running per tenant, leased to p_owner; reclaims expired leases first. Runs cpa.todo_claim_v3.';
revoke execute on function
  cpa.todo_claim_v2(text, text, integer, double precision, uuid, text[], integer)
  from public, anon, authenticated;
grant execute on function
  cpa.todo_claim_v2(text, text, integer, double precision, uuid, text[], integer)
  to service_role;

create or replace function cpa.todo_claim_v1(
  p_target text,
  p_owner text,
  p_limit integer,
  p_lease_seconds double precision default 60,
  p_tenant_id uuid default null,
  p_actions text[] default null
) returns setof public.todos
language sql security definer set search_path = ''
as $$
  select * from cpa.todo_claim_v3(p_target, p_owner, p_limit, p_lease_seconds, p_tenant_id,
                                  p_actions, null)
$$;
comment on function cpa.todo_claim_v1 is 'Claim up to p_limit ready ToDos of a target with FOR UPDATE SKIP LOCKED, fair across tenants, leased to p_owner; reclaims expired leases first. Runs cpa.todo_claim_v3 without a tenant cap.';
revoke execute on function
  cpa.todo_claim_v1(text, text, integer, double precision, uuid, text[])
  from public, anon, authenticated;
grant execute on function
  cpa.todo_claim_v1(text, text, integer, double precision, uuid, text[])
  to service_role;
