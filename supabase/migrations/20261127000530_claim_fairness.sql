-- Claim v2: a cap on running ToDos per tenant, and reclaiming the leases of dead owners.
-- v1's equal share per claim is not enough: a tenant with 400 long ToDos fills every slot of
-- the dispatcher one claim after another, and another tenant's ToDo waits for a slot to free
-- (28 s seen). v2 takes p_tenant_cap: a tenant never holds more than that many running ToDos
-- of the target, so the dispatcher keeps room for everyone else. The cap comes from the
-- dispatcher's settings (CPA_TENANT_RUNNING_CAP), null means none (v1's behaviour).
-- v1 stays for code still calling it during a deploy.

-- Counting a tenant's running ToDos per claim: one index range per active tenant.
create index if not exists todos_running_tenant_idx on public.todos (tenant_id, target)
  where status = 'running';

create function cpa.todo_claim_v2(
  p_target text,
  p_owner text,
  p_limit integer,
  p_lease_seconds double precision default 60,
  p_tenant_id uuid default null,
  p_actions text[] default null,
  p_tenant_cap integer default null
) returns setof public.todos
language plpgsql security definer set search_path = ''
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
      from picked
     where t.id = picked.id
    returning t.*
  ), started as (
    update public.jobs j
       set status = 'running', started_at = coalesce(j.started_at, now())
     where j.id in (select p.id from public.jobs p
                     where p.id in (select claimed.job_id from claimed) and p.status = 'pending'
                       for update skip locked)
  )
  select * from claimed;
end;
$$;
comment on function cpa.todo_claim_v2 is 'Claim up to p_limit ready ToDos of a target (FOR UPDATE SKIP LOCKED), fair across tenants and at most p_tenant_cap running per tenant, leased to p_owner; reclaims expired leases first.';

-- Dead owners: a restarted dispatcher names the owners it has proven dead (same host, process
-- gone); their leases are treated as expired now instead of after up to a whole lease. Only
-- dispatcher owners qualify, never a desktop agent's.
create function cpa.todo_reclaim_dead_v1(p_owners text[])
returns integer
language plpgsql security definer set search_path = ''
as $$
declare
  v_count integer;
begin
  update public.todos t
     set lease_expires_at = now() - interval '1 millisecond'
   where t.status = 'running' and t.lease_owner = any(p_owners)
     and t.lease_owner like 'dispatcher:%';
  get diagnostics v_count = row_count;
  if v_count > 0 then
    perform private.todo_expire_v1(greatest(v_count, 100));
  end if;
  return v_count;
end;
$$;
comment on function cpa.todo_reclaim_dead_v1 is 'Expire now the leases held by dispatcher owners proven dead; they are requeued (or failed on their last attempt) as on expiry.';

-- The lease owners of running cloud ToDos whose name starts with p_prefix (one host's).
create function cpa.todo_lease_owners_v1(p_prefix text)
returns setof text
language sql stable security definer set search_path = ''
as $$
  select distinct t.lease_owner from public.todos t
   where t.status = 'running' and t.lease_owner like p_prefix || '%'
$$;

-- grants ---------------------------------------------------------------------------------------
revoke execute on function
  cpa.todo_claim_v2(text, text, integer, double precision, uuid, text[], integer),
  cpa.todo_reclaim_dead_v1(text[]),
  cpa.todo_lease_owners_v1(text)
  from public, anon, authenticated;
grant execute on function
  cpa.todo_claim_v2(text, text, integer, double precision, uuid, text[], integer),
  cpa.todo_reclaim_dead_v1(text[]),
  cpa.todo_lease_owners_v1(text)
  to service_role;
