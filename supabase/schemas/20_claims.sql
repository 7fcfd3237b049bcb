-- Claims and leases: who runs a ready ToDo, and the gates that order writers
--
-- A claim leases ready, due ToDos of one target (fair across tenants, capped per
-- tenant) to one owner until `lease_expires_at`; an expired lease goes back to ready
-- (or fails for good past its retries) before the claim looks. Lock order for every
-- writer: the per-job gate (advisory lock class 1785; completions shared, everything
-- else exclusive), then job rows, then ToDo rows, in ascending id, then the events
-- flush's bucket locks at commit. Desktop agents hold leases as `agent:<key>`
-- (`private.agent_owner_v1`).
--
-- Generated from supabase/migrations by scripts/schemas.py; edit a migration (and
-- the header in that script), then run `python scripts/schemas.py write`.

set check_function_bodies = false;

-- FUNCTION cpa.agent_claim_v2(uuid, text, text[], integer, double precision)
CREATE FUNCTION cpa.agent_claim_v2(p_tenant_id uuid, p_agent_key text, p_actions text[], p_limit integer, p_lease_seconds double precision DEFAULT 300) RETURNS SETOF public.todos
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    AS $$
declare
  v_agent public.agents;
  v_anyone boolean;
  v_owner constant text := private.agent_owner_v1(p_agent_key);
begin
  v_agent := private.agent_bind_v1(p_tenant_id, p_agent_key, p_actions, null);
  -- Jobs nobody owns (made by the service role) go to agents of those who see them: the
  -- tenant's owners and admins, and agents the service registered.
  v_anyone := v_agent.created_by is null or exists (
    select 1 from public.memberships m
     where m.tenant_id = p_tenant_id and m.user_id = v_agent.created_by
       and m.role in ('owner', 'admin'));
  perform private.todo_expire_v3(100);
  return query
  with picked as materialized (
    select t.id from public.todos t
     where t.status = 'ready' and t.target = 'desktop' and t.tenant_id = p_tenant_id
       and t.run_after <= now()
       and (p_actions is null or t.action = any(p_actions))
       and (t.assigned_agent is null or t.assigned_agent = p_agent_key)
       and exists (select 1 from public.jobs j
                    where j.id = t.job_id
                      and (j.created_by = v_agent.created_by
                           or (j.created_by is null and v_anyone)))
     order by t.priority desc, t.run_after
     limit least(greatest(p_limit, 1), 50)
     for update of t skip locked
  ), claimed as (
    update public.todos t
       set status = 'running', attempts = t.attempts + 1, lease_owner = v_owner,
           lease_expires_at = now() + make_interval(secs => least(greatest(p_lease_seconds, 5), 3600)),
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
-- COMMENT on FUNCTION cpa.agent_claim_v2(p_tenant_id uuid, p_agent_key text, p_actions text[], p_limit integer, p_lease_seconds double precision)
COMMENT ON FUNCTION cpa.agent_claim_v2(p_tenant_id uuid, p_agent_key text, p_actions text[], p_limit integer, p_lease_seconds double precision) IS 'A desktop agent claims the ready desktop ToDos of its user''s jobs for the actions it offers, leased to private.agent_owner_v1(p_agent_key); the agent id is bound to its first user (CP403 for another).';
-- ACL on FUNCTION cpa.agent_claim_v2(p_tenant_id uuid, p_agent_key text, p_actions text[], p_limit integer, p_lease_seconds double precision)
REVOKE ALL ON FUNCTION cpa.agent_claim_v2(p_tenant_id uuid, p_agent_key text, p_actions text[], p_limit integer, p_lease_seconds double precision) FROM PUBLIC;
GRANT ALL ON FUNCTION cpa.agent_claim_v2(p_tenant_id uuid, p_agent_key text, p_actions text[], p_limit integer, p_lease_seconds double precision) TO authenticated;
GRANT ALL ON FUNCTION cpa.agent_claim_v2(p_tenant_id uuid, p_agent_key text, p_actions text[], p_limit integer, p_lease_seconds double precision) TO service_role;

-- TABLE public.agents
CREATE TABLE public.agents (
    id uuid DEFAULT gen_random_uuid() NOT NULL,
    tenant_id uuid NOT NULL,
    agent_key text NOT NULL,
    name text,
    actions text[] DEFAULT '{}'::text[] NOT NULL,
    created_by uuid,
    last_seen_at timestamp with time zone DEFAULT now() NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT agents_agent_key_check CHECK (((length(agent_key) >= 1) AND (length(agent_key) <= 200)))
);
-- COMMENT on TABLE public.agents
COMMENT ON TABLE public.agents IS 'Desktop agents of a tenant, the actions each offers, and when each was last seen.';
-- CONSTRAINT public.agents agents_pkey
ALTER TABLE ONLY public.agents
    ADD CONSTRAINT agents_pkey PRIMARY KEY (id);
-- CONSTRAINT public.agents agents_tenant_id_agent_key_key
ALTER TABLE ONLY public.agents
    ADD CONSTRAINT agents_tenant_id_agent_key_key UNIQUE (tenant_id, agent_key);
-- ROW SECURITY public.agents
ALTER TABLE public.agents ENABLE ROW LEVEL SECURITY;
-- ACL on TABLE public.agents
GRANT SELECT ON TABLE public.agents TO authenticated;
GRANT SELECT,INSERT,DELETE,UPDATE ON TABLE public.agents TO service_role;

-- FUNCTION cpa.agent_upsert_v1(uuid, text, text, text[])
CREATE FUNCTION cpa.agent_upsert_v1(p_tenant_id uuid, p_agent_key text, p_name text, p_actions text[]) RETURNS public.agents
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    AS $$
begin
  return private.agent_bind_v1(p_tenant_id, p_agent_key, coalesce(p_actions, '{}'), p_name);
end;
$$;
-- COMMENT on FUNCTION cpa.agent_upsert_v1(p_tenant_id uuid, p_agent_key text, p_name text, p_actions text[])
COMMENT ON FUNCTION cpa.agent_upsert_v1(p_tenant_id uuid, p_agent_key text, p_name text, p_actions text[]) IS 'Register an agent (an offer): bound to the calling user on first use, CP403 if another user holds the id; writes only what changed.';
-- ACL on FUNCTION cpa.agent_upsert_v1(p_tenant_id uuid, p_agent_key text, p_name text, p_actions text[])
REVOKE ALL ON FUNCTION cpa.agent_upsert_v1(p_tenant_id uuid, p_agent_key text, p_name text, p_actions text[]) FROM PUBLIC;
GRANT ALL ON FUNCTION cpa.agent_upsert_v1(p_tenant_id uuid, p_agent_key text, p_name text, p_actions text[]) TO authenticated;
GRANT ALL ON FUNCTION cpa.agent_upsert_v1(p_tenant_id uuid, p_agent_key text, p_name text, p_actions text[]) TO service_role;

-- FUNCTION cpa.desktop_sweep_v3(double precision)
CREATE FUNCTION cpa.desktop_sweep_v3(p_seen_seconds double precision DEFAULT 120) RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    AS $$
declare
  v_jobs uuid[];
  v_noticed integer;
  v_ids uuid[];
  v_errors text[];
  v_skipped integer := 0;
  v_due uuid[];
begin
  -- Desktop ToDos that have come due (run_at, a retry's backoff): no status change announces
  -- them, so wake their owners' agents here, once (un-parked, they are not found again).
  -- SKIP LOCKED, no gate: as the claims' un-parking; nothing below waits for these rows.
  with due as (
    select t.id from public.todos t
     where t.status = 'ready' and t.parked and t.target = 'desktop' and t.run_after <= now()
     order by t.run_after
     limit 1000
     for update skip locked
  ), unparked as (
    update public.todos t set parked = false from due where t.id = due.id returning t.id
  )
  select array_agg(u.id order by u.id) into v_due from unparked u;
  if v_due is not null then
    perform private.agent_wake_v1(v_due);
  end if;

  v_jobs := private.job_gate_try_v1(array(
    (select t.job_id from public.todos t
      where t.status = 'ready' and t.target = 'desktop' and t.agent_noticed_at is null
        and t.run_after <= now()
        and not exists (
          select 1 from public.agents a join public.jobs j on j.id = t.job_id
           where a.tenant_id = t.tenant_id and t.action = any(a.actions)
             and a.last_seen_at > now() - make_interval(secs => p_seen_seconds)
             and (t.assigned_agent is null or a.agent_key = t.assigned_agent)
             -- An agent that may claim it (cpa.agent_claim_v2): the job owner's, or for a job
             -- nobody owns one the service registered or an owner's or admin's.
             and (a.created_by = j.created_by
                  or (j.created_by is null
                      and (a.created_by is null
                           or exists (select 1 from public.memberships m
                                       where m.tenant_id = t.tenant_id
                                         and m.user_id = a.created_by
                                         and m.role in ('owner', 'admin'))))))
      order by t.id
      limit 500)
    union all
    select t.job_id from public.todos t
     where t.status = 'ready' and t.target = 'desktop' and t.agent_timeout_seconds is not null
       and t.run_after + make_interval(secs => t.agent_timeout_seconds) < now()));
  if cardinality(v_jobs) = 0 then
    return 0;
  end if;
  select array_agg(x.id order by x.id) into v_jobs
    from (select j.id from public.jobs j where j.id = any(v_jobs)
           order by j.id for no key update skip locked) x;
  if v_jobs is null then
    return 0;
  end if;

  with waiting as (
    select t.id from public.todos t
     where t.status = 'ready' and t.target = 'desktop' and t.agent_noticed_at is null
       and t.run_after <= now() and t.job_id = any(v_jobs)
       and not exists (
         select 1 from public.agents a join public.jobs j on j.id = t.job_id
          where a.tenant_id = t.tenant_id and t.action = any(a.actions)
            and a.last_seen_at > now() - make_interval(secs => p_seen_seconds)
            and (t.assigned_agent is null or a.agent_key = t.assigned_agent)
            and (a.created_by = j.created_by
                 or (j.created_by is null
                     and (a.created_by is null
                          or exists (select 1 from public.memberships m
                                      where m.tenant_id = t.tenant_id
                                        and m.user_id = a.created_by
                                        and m.role in ('owner', 'admin'))))))
     order by t.id
     limit 500
     for no key update skip locked
  ), marked as (
    update public.todos t set agent_noticed_at = now()
      from waiting w where t.id = w.id
    returning t.*
  ), noted as (
    insert into public.job_events (tenant_id, job_id, todo_id, kind, status, data)
    select m.tenant_id, m.job_id, m.id, 'todo.waiting_for_agent', m.status,
           jsonb_strip_nulls(jsonb_build_object(
             'key', m.key, 'action', m.action, 'target', m.target,
             'agent', m.assigned_agent, 'agent_timeout', m.agent_timeout_seconds,
             'message', format('waiting for an agent offering %s', m.action)))
      from marked m
    returning 1
  )
  select count(*)::integer into v_noticed from noted;

  -- Skipping completes the ToDo the usual way (releasing dependents, finishing the job): it is
  -- leased to the sweep first so todo_complete accepts it. The exclusive gate is held already.
  with expired as (
    select t.id from public.todos t
     where t.status = 'ready' and t.target = 'desktop' and t.optional
       and t.agent_timeout_seconds is not null and t.job_id = any(v_jobs)
       and t.run_after + make_interval(secs => t.agent_timeout_seconds) < now()
     order by t.id
     for no key update skip locked
  ), leased as (
    update public.todos t set status = 'running', lease_owner = 'sweep',
           lease_expires_at = now() + interval '1 minute', started_at = now()
      from expired e where t.id = e.id
    returning t.id, t.action, t.agent_timeout_seconds
  )
  select coalesce(cpa.todo_complete_v4(jsonb_agg(jsonb_build_object(
           'id', l.id, 'owner', 'sweep',
           'result', jsonb_build_object('skipped', true, 'reason',
             format('No agent offering %s took it within %s seconds.', l.action, l.agent_timeout_seconds))))), 0)
    into v_skipped
    from leased l;

  select array_agg(t.id order by t.id),
         array_agg(format('No agent offering %s took the ToDo %L within %s seconds; start an agent that offers %s (cpa-scheduler agent) or raise agent_timeout.',
                          t.action, t.key, t.agent_timeout_seconds, t.action) order by t.id)
    into v_ids, v_errors
    from public.todos t
   where t.status = 'ready' and t.target = 'desktop' and t.agent_timeout_seconds is not null
     and not t.optional and t.job_id = any(v_jobs)
     and t.run_after + make_interval(secs => t.agent_timeout_seconds) < now();
  if v_ids is not null then
    perform private.todo_fail_terminal_v2(v_ids, v_errors);
  end if;
  return v_noticed + v_skipped + coalesce(array_length(v_ids, 1), 0);
end;
$$;
-- COMMENT on FUNCTION cpa.desktop_sweep_v3(p_seen_seconds double precision)
COMMENT ON FUNCTION cpa.desktop_sweep_v3(p_seen_seconds double precision) IS 'Wake the agents of desktop ToDos that came due; announce once (todo.waiting_for_agent) ready desktop ToDos that no agent allowed to claim them (the job owner''s) has offered in p_seen_seconds; skip optional and fail other ToDos past their agent_timeout_seconds. Takes the jobs'' gates exclusively without waiting (held jobs are swept on the next pass), then their rows, then the ToDos.';
-- ACL on FUNCTION cpa.desktop_sweep_v3(p_seen_seconds double precision)
REVOKE ALL ON FUNCTION cpa.desktop_sweep_v3(p_seen_seconds double precision) FROM PUBLIC;
GRANT ALL ON FUNCTION cpa.desktop_sweep_v3(p_seen_seconds double precision) TO service_role;

-- FUNCTION cpa.job_gate_v1(uuid[], uuid[])
CREATE FUNCTION cpa.job_gate_v1(p_exclusive uuid[], p_shared uuid[] DEFAULT '{}'::uuid[]) RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    AS $$
begin
  -- One statement, run to its end: the locks are taken after the sort (PostgreSQL evaluates a
  -- volatile target list above the Sort), in key order. A loop cost ~20 us a lock.
  perform case when g.exclusive then pg_advisory_xact_lock(1785, g.key)
               else pg_advisory_xact_lock_shared(1785, g.key) end
     from (select private.job_gate_key_v1(u.job_id) as key, bool_or(u.exclusive) as exclusive
             from (select e.job_id, true as exclusive from unnest(p_exclusive) e(job_id)
                   union all
                   select s.job_id, false from unnest(p_shared) s(job_id)) u
            where u.job_id is not null
            group by 1) g
    order by g.key;
  return (select count(distinct u.id)::integer
            from unnest(p_exclusive || p_shared) u(id) where u.id is not null);
end;
$$;
-- COMMENT on FUNCTION cpa.job_gate_v1(p_exclusive uuid[], p_shared uuid[])
COMMENT ON FUNCTION cpa.job_gate_v1(p_exclusive uuid[], p_shared uuid[]) IS 'Take these jobs'' gates for the rest of the transaction, in key order (exclusive wins where a job is in both lists): a transaction that calls several operations takes its gates first.';
-- ACL on FUNCTION cpa.job_gate_v1(p_exclusive uuid[], p_shared uuid[])
REVOKE ALL ON FUNCTION cpa.job_gate_v1(p_exclusive uuid[], p_shared uuid[]) FROM PUBLIC;
GRANT ALL ON FUNCTION cpa.job_gate_v1(p_exclusive uuid[], p_shared uuid[]) TO service_role;

-- FUNCTION cpa.todo_claim_v3(text, text, integer, double precision, uuid, text[], integer)
CREATE FUNCTION cpa.todo_claim_v3(p_target text, p_owner text, p_limit integer, p_lease_seconds double precision DEFAULT 60, p_tenant_id uuid DEFAULT NULL::uuid, p_actions text[] DEFAULT NULL::text[], p_tenant_cap integer DEFAULT NULL::integer) RETURNS SETOF public.todos
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    SET random_page_cost TO '1.1'
    AS $$
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
-- COMMENT on FUNCTION cpa.todo_claim_v3(p_target text, p_owner text, p_limit integer, p_lease_seconds double precision, p_tenant_id uuid, p_actions text[], p_tenant_cap integer)
COMMENT ON FUNCTION cpa.todo_claim_v3(p_target text, p_owner text, p_limit integer, p_lease_seconds double precision, p_tenant_id uuid, p_actions text[], p_tenant_cap integer) IS 'Claim up to p_limit ready ToDos of a target (FOR UPDATE SKIP LOCKED), fair across tenants and at most p_tenant_cap running per tenant, leased to p_owner; reclaims expired leases first. As v2, with index plans.';
-- ACL on FUNCTION cpa.todo_claim_v3(p_target text, p_owner text, p_limit integer, p_lease_seconds double precision, p_tenant_id uuid, p_actions text[], p_tenant_cap integer)
REVOKE ALL ON FUNCTION cpa.todo_claim_v3(p_target text, p_owner text, p_limit integer, p_lease_seconds double precision, p_tenant_id uuid, p_actions text[], p_tenant_cap integer) FROM PUBLIC;
GRANT ALL ON FUNCTION cpa.todo_claim_v3(p_target text, p_owner text, p_limit integer, p_lease_seconds double precision, p_tenant_id uuid, p_actions text[], p_tenant_cap integer) TO service_role;

-- FUNCTION cpa.todo_extend_v2(uuid[], text, double precision)
CREATE FUNCTION cpa.todo_extend_v2(p_ids uuid[], p_owner text, p_lease_seconds double precision) RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    AS $$
declare
  v_count integer;
begin
  perform private.todo_jobs_lock_v1(p_ids);
  perform 1 from public.todos t
   where t.id = any(p_ids) and t.status = 'running' and t.lease_owner = p_owner
   order by t.id for no key update;
  update public.todos t
     set lease_expires_at = now() + make_interval(secs => p_lease_seconds)
   where t.id = any(p_ids) and t.status = 'running' and t.lease_owner = p_owner;
  get diagnostics v_count = row_count;
  return v_count;
end;
$$;
-- COMMENT on FUNCTION cpa.todo_extend_v2(p_ids uuid[], p_owner text, p_lease_seconds double precision)
COMMENT ON FUNCTION cpa.todo_extend_v2(p_ids uuid[], p_owner text, p_lease_seconds double precision) IS 'Extend the leases of running ToDos held by p_owner. Locks the jobs first, then the ToDos by id.';
-- ACL on FUNCTION cpa.todo_extend_v2(p_ids uuid[], p_owner text, p_lease_seconds double precision)
REVOKE ALL ON FUNCTION cpa.todo_extend_v2(p_ids uuid[], p_owner text, p_lease_seconds double precision) FROM PUBLIC;
GRANT ALL ON FUNCTION cpa.todo_extend_v2(p_ids uuid[], p_owner text, p_lease_seconds double precision) TO service_role;

-- FUNCTION cpa.todo_lease_owners_v1(text)
CREATE FUNCTION cpa.todo_lease_owners_v1(p_prefix text) RETURNS SETOF text
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path TO ''
    AS $$
  select distinct t.lease_owner from public.todos t
   where t.status = 'running' and t.lease_owner like p_prefix || '%'
$$;
-- ACL on FUNCTION cpa.todo_lease_owners_v1(p_prefix text)
REVOKE ALL ON FUNCTION cpa.todo_lease_owners_v1(p_prefix text) FROM PUBLIC;
GRANT ALL ON FUNCTION cpa.todo_lease_owners_v1(p_prefix text) TO service_role;

-- FUNCTION cpa.todo_reclaim_dead_v1(text[])
CREATE FUNCTION cpa.todo_reclaim_dead_v1(p_owners text[]) RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    AS $$
declare
  v_count integer;
begin
  update public.todos t
     set lease_expires_at = now() - interval '1 millisecond'
   where t.status = 'running' and t.lease_owner = any(p_owners)
     and t.lease_owner like 'dispatcher:%';
  get diagnostics v_count = row_count;
  if v_count > 0 then
    perform private.todo_expire_v3(greatest(v_count, 100));
  end if;
  return v_count;
end;
$$;
-- COMMENT on FUNCTION cpa.todo_reclaim_dead_v1(p_owners text[])
COMMENT ON FUNCTION cpa.todo_reclaim_dead_v1(p_owners text[]) IS 'Expire now the leases held by dispatcher owners proven dead; they are requeued (or failed on their last attempt) as on expiry.';
-- ACL on FUNCTION cpa.todo_reclaim_dead_v1(p_owners text[])
REVOKE ALL ON FUNCTION cpa.todo_reclaim_dead_v1(p_owners text[]) FROM PUBLIC;
GRANT ALL ON FUNCTION cpa.todo_reclaim_dead_v1(p_owners text[]) TO service_role;

-- FUNCTION cpa.todo_snooze_v1(uuid, text, timestamp with time zone)
CREATE FUNCTION cpa.todo_snooze_v1(p_id uuid, p_owner text, p_until timestamp with time zone) RETURNS boolean
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    AS $$
begin
  update public.todos t
     set status = 'ready', timer_until = p_until, run_after = p_until,
         attempts = greatest(t.attempts - 1, 0), lease_owner = null, lease_expires_at = null,
         updated_at = now()
   where t.id = p_id and t.status = 'running' and t.lease_owner = p_owner;
  return found;
end;
$$;
-- COMMENT on FUNCTION cpa.todo_snooze_v1(p_id uuid, p_owner text, p_until timestamp with time zone)
COMMENT ON FUNCTION cpa.todo_snooze_v1(p_id uuid, p_owner text, p_until timestamp with time zone) IS 'Park a leased timer ToDo until p_until without holding a worker or spending an attempt.';
-- ACL on FUNCTION cpa.todo_snooze_v1(p_id uuid, p_owner text, p_until timestamp with time zone)
REVOKE ALL ON FUNCTION cpa.todo_snooze_v1(p_id uuid, p_owner text, p_until timestamp with time zone) FROM PUBLIC;
GRANT ALL ON FUNCTION cpa.todo_snooze_v1(p_id uuid, p_owner text, p_until timestamp with time zone) TO service_role;

-- FUNCTION private.agent_bind_v1(uuid, text, text[], text)
CREATE FUNCTION private.agent_bind_v1(p_tenant_id uuid, p_agent_key text, p_actions text[], p_name text) RETURNS public.agents
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    AS $$
declare
  v_uid uuid := (select auth.uid());
  v_agent public.agents;
begin
  perform private.tenant_authorize_v1(p_tenant_id);
  for i in 1 .. 2 loop
    select * into v_agent from public.agents a
     where a.tenant_id = p_tenant_id and a.agent_key = p_agent_key;
    if found then
      if v_uid is not null and v_agent.created_by is not null and v_agent.created_by <> v_uid then
        raise exception 'The agent id % belongs to another user of this tenant.', p_agent_key
          using errcode = 'CP403',
                hint = 'Each user''s desktop registers its own agent_id; choose another one.';
      end if;
      if (v_uid is not null and v_agent.created_by is null)
         or v_agent.last_seen_at < now() - interval '45 seconds'
         or (p_actions is not null and v_agent.actions is distinct from p_actions)
         or (p_name is not null and v_agent.name is distinct from p_name) then
        update public.agents a
           set created_by = coalesce(a.created_by, v_uid), last_seen_at = now(),
               actions = coalesce(p_actions, a.actions), name = coalesce(p_name, a.name)
         where a.id = v_agent.id
        returning * into v_agent;
      end if;
      return v_agent;
    end if;
    insert into public.agents (tenant_id, agent_key, name, actions, created_by)
    values (p_tenant_id, p_agent_key, p_name, coalesce(p_actions, '{}'), v_uid)
    on conflict (tenant_id, agent_key) do nothing
    returning * into v_agent;
    if found then
      return v_agent;
    end if;
    -- Registered by a concurrent call: read it again (and check whose it is).
  end loop;
  raise exception 'The agent % could not be registered; try again.', p_agent_key using errcode = '40001';
end;
$$;
-- COMMENT on FUNCTION private.agent_bind_v1(p_tenant_id uuid, p_agent_key text, p_actions text[], p_name text)
COMMENT ON FUNCTION private.agent_bind_v1(p_tenant_id uuid, p_agent_key text, p_actions text[], p_name text) IS 'The agent row of (tenant, key), registered to and bound to the calling user on first use; CP403 if another user holds the key. Writes only what changed (last_seen_at when older than 45 s).';
-- ACL on FUNCTION private.agent_bind_v1(p_tenant_id uuid, p_agent_key text, p_actions text[], p_name text)
REVOKE ALL ON FUNCTION private.agent_bind_v1(p_tenant_id uuid, p_agent_key text, p_actions text[], p_name text) FROM PUBLIC;

-- FUNCTION private.agent_items_v1(text, jsonb)
CREATE FUNCTION private.agent_items_v1(p_agent_key text, p_items jsonb) RETURNS jsonb
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path TO ''
    AS $$
begin
  if private.caller_is_user_v1() and exists (
       select 1 from public.agents a
        where a.agent_key = p_agent_key
          and a.tenant_id in (select private.user_tenant_ids_v1())
          and a.created_by is not null and a.created_by <> (select auth.uid())) then
    raise exception 'The agent id % belongs to another user of this tenant.', p_agent_key
      using errcode = 'CP403',
            hint = 'Each user''s desktop registers its own agent_id; report under your own.';
  end if;
  return (select coalesce(jsonb_agg(i.item || jsonb_build_object('owner', private.agent_owner_v1(p_agent_key))
                                    order by i.n), '[]'::jsonb)
            from jsonb_array_elements(p_items) with ordinality as i(item, n));
end;
$$;
-- COMMENT on FUNCTION private.agent_items_v1(p_agent_key text, p_items jsonb)
COMMENT ON FUNCTION private.agent_items_v1(p_agent_key text, p_items jsonb) IS 'Report items with the agent''s lease owner (private.agent_owner_v1) as each item''s owner; CP403 when a user reports under another user''s agent id.';
-- ACL on FUNCTION private.agent_items_v1(p_agent_key text, p_items jsonb)
REVOKE ALL ON FUNCTION private.agent_items_v1(p_agent_key text, p_items jsonb) FROM PUBLIC;

-- FUNCTION private.agent_owner_v1(text)
CREATE FUNCTION private.agent_owner_v1(p_agent_key text) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    SET search_path TO ''
    AS $$
  select 'agent:' || p_agent_key
$$;
-- COMMENT on FUNCTION private.agent_owner_v1(p_agent_key text)
COMMENT ON FUNCTION private.agent_owner_v1(p_agent_key text) IS 'The lease owner of a desktop agent''s ToDos: agent:<agent key>. The only place that spells it.';
-- ACL on FUNCTION private.agent_owner_v1(p_agent_key text)
REVOKE ALL ON FUNCTION private.agent_owner_v1(p_agent_key text) FROM PUBLIC;

-- FUNCTION private.agent_wake_v1(uuid[])
CREATE FUNCTION private.agent_wake_v1(p_todo_ids uuid[]) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    AS $$
declare
  r record;
begin
  for r in
    select t.tenant_id, j.created_by, t.id, t.job_id, t.action
      from public.todos t join public.jobs j on j.id = t.job_id
     where t.id = any(p_todo_ids) and j.created_by is not null
     order by t.id
  loop
    perform realtime.send(jsonb_build_object('todo_id', r.id, 'job_id', r.job_id, 'action', r.action),
                          'todo_ready',
                          'tenant:' || r.tenant_id::text || ':agents:' || r.created_by::text, true);
    perform pg_notify('cpa_desktop_ready', r.tenant_id::text || ':' || r.created_by::text);
  end loop;
end;
$$;
-- COMMENT on FUNCTION private.agent_wake_v1(p_todo_ids uuid[])
COMMENT ON FUNCTION private.agent_wake_v1(p_todo_ids uuid[]) IS 'Wake the job owner''s desktop agents for ToDos that became ready: Realtime todo_ready on tenant:<t>:agents:<u> and NOTIFY cpa_desktop_ready ''<t>:<u>''.';
-- ACL on FUNCTION private.agent_wake_v1(p_todo_ids uuid[])
REVOKE ALL ON FUNCTION private.agent_wake_v1(p_todo_ids uuid[]) FROM PUBLIC;

-- FUNCTION private.job_gate_key_v1(uuid)
CREATE FUNCTION private.job_gate_key_v1(p_job_id uuid) RETURNS integer
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    SET search_path TO ''
    AS $$
  select ('x' || right(p_job_id::text, 8))::bit(32)::integer
$$;
-- COMMENT on FUNCTION private.job_gate_key_v1(p_job_id uuid)
COMMENT ON FUNCTION private.job_gate_key_v1(p_job_id uuid) IS 'The advisory lock key of a job''s gate (class 1785).';
-- ACL on FUNCTION private.job_gate_key_v1(p_job_id uuid)
REVOKE ALL ON FUNCTION private.job_gate_key_v1(p_job_id uuid) FROM PUBLIC;

-- FUNCTION private.job_gate_try_v1(uuid[])
CREATE FUNCTION private.job_gate_try_v1(p_jobs uuid[]) RETURNS uuid[]
    LANGUAGE sql SECURITY DEFINER
    SET search_path TO ''
    AS $$
  select coalesce(array_agg(j.id order by j.id), '{}')
    from (select distinct u.id from unnest(p_jobs) u(id) where u.id is not null) j
   where pg_try_advisory_xact_lock(1785, private.job_gate_key_v1(j.id))
$$;
-- COMMENT on FUNCTION private.job_gate_try_v1(p_jobs uuid[])
COMMENT ON FUNCTION private.job_gate_try_v1(p_jobs uuid[]) IS 'Take the exclusive gates of these jobs where no one holds them, without waiting; answers the jobs gated.';
-- ACL on FUNCTION private.job_gate_try_v1(p_jobs uuid[])
REVOKE ALL ON FUNCTION private.job_gate_try_v1(p_jobs uuid[]) FROM PUBLIC;

-- FUNCTION private.lost_lease_limit_v1()
CREATE FUNCTION private.lost_lease_limit_v1() RETURNS integer
    LANGUAGE sql STABLE
    SET search_path TO ''
    AS $_$
  select least(greatest(coalesce(
           case when current_setting('cpa.lost_lease_limit', true) ~ '^\s*[0-9]{1,4}\s*$'
                then current_setting('cpa.lost_lease_limit', true)::integer end,
           5), 1), 1000)
$_$;
-- COMMENT on FUNCTION private.lost_lease_limit_v1()
COMMENT ON FUNCTION private.lost_lease_limit_v1() IS 'How many lost leases a ToDo may have before it fails: the transaction''s cpa.lost_lease_limit (CPA_LOST_LEASE_LIMIT), 5 when unset, within 1..1000.';
-- ACL on FUNCTION private.lost_lease_limit_v1()
REVOKE ALL ON FUNCTION private.lost_lease_limit_v1() FROM PUBLIC;

-- FUNCTION private.todo_claim_pick_v1(text, text, integer, double precision, uuid, text[], integer)
CREATE FUNCTION private.todo_claim_pick_v1(p_target text, p_owner text, p_limit integer, p_lease_seconds double precision DEFAULT 60, p_tenant_id uuid DEFAULT NULL::uuid, p_actions text[] DEFAULT NULL::text[], p_tenant_cap integer DEFAULT NULL::integer) RETURNS SETOF public.todos
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    SET random_page_cost TO '1.1'
    AS $$
declare
  v_tenants uuid[];
  v_share integer;
  v_due uuid[];
begin
  perform private.todo_expire_v3(100);
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
-- COMMENT on FUNCTION private.todo_claim_pick_v1(p_target text, p_owner text, p_limit integer, p_lease_seconds double precision, p_tenant_id uuid, p_actions text[], p_tenant_cap integer)
COMMENT ON FUNCTION private.todo_claim_pick_v1(p_target text, p_owner text, p_limit integer, p_lease_seconds double precision, p_tenant_id uuid, p_actions text[], p_tenant_cap integer) IS 'The claim of cpa.todo_claim_v3 without starting the jobs: expired leases first, parked ToDos that came due un-parked, fair across tenants, at most p_tenant_cap running per tenant, FOR UPDATE SKIP LOCKED; the caller starts the claimed ToDos'' pending jobs.';
-- ACL on FUNCTION private.todo_claim_pick_v1(p_target text, p_owner text, p_limit integer, p_lease_seconds double precision, p_tenant_id uuid, p_actions text[], p_tenant_cap integer)
REVOKE ALL ON FUNCTION private.todo_claim_pick_v1(p_target text, p_owner text, p_limit integer, p_lease_seconds double precision, p_tenant_id uuid, p_actions text[], p_tenant_cap integer) FROM PUBLIC;

-- FUNCTION private.todo_expire_v3(integer)
CREATE FUNCTION private.todo_expire_v3(p_limit integer DEFAULT 100) RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    AS $$
declare
  v_jobs uuid[];
  v_spent uuid[];
  v_count integer;
  v_limit integer := private.lost_lease_limit_v1();
begin
  v_jobs := private.job_gate_try_v1(array(
    select t.job_id from public.todos t
     where t.status = 'running' and t.lease_expires_at < now()
     order by t.lease_expires_at limit p_limit));
  if cardinality(v_jobs) = 0 then
    return 0;
  end if;
  select array_agg(x.id order by x.id) into v_jobs
    from (select j.id from public.jobs j where j.id = any(v_jobs)
           order by j.id for no key update skip locked) x;
  if v_jobs is null then
    return 0;
  end if;
  -- A ToDo of a job that ended (cancelled, failed) while it ran is not run again: it ends
  -- cancelled.
  with expired as (
    select t.id, t.lost_leases + 1 as lost, j.status in ('pending', 'running') as live
      from public.todos t join public.jobs j on j.id = t.job_id
     where t.status = 'running' and t.lease_expires_at < now() and t.job_id = any(v_jobs)
     order by t.lease_expires_at limit p_limit
     for update of t skip locked
  ), requeued as (
    -- "The lease expired during attempt" starts the text metrics.observe_claim counts.
    update public.todos t
       set status = 'ready', lease_owner = null, lease_expires_at = null, run_after = now(),
           lost_leases = e.lost,
           error = format('The lease expired during attempt %s: its worker was lost (%s of at most %s lost workers; this does not count against max_attempts).',
                          t.attempts, e.lost, v_limit),
           updated_at = now()
      from expired e
     where t.id = e.id and e.live and e.lost < v_limit
    returning t.id
  ), spent as (
    update public.todos t set lost_leases = e.lost
      from expired e
     where t.id = e.id and e.live and e.lost >= v_limit
    returning t.id
  ), ended as (
    update public.todos t
       set status = 'cancelled', lease_owner = null, lease_expires_at = null, finished_at = now(),
           lost_leases = e.lost,
           error = format('The lease expired during attempt %s, after the job had ended.', t.attempts),
           updated_at = now()
      from expired e
     where t.id = e.id and not e.live
    returning t.id
  )
  select (select count(*) from requeued)::integer + (select count(*) from ended)::integer,
         (select array_agg(s.id) from spent s)
    into v_count, v_spent;
  if v_spent is not null then
    perform private.todo_fail_terminal_v2(
      v_spent,
      array(select format('The worker running it was lost %s times (each time its process died or stopped answering and the lease ran out), so it may crash every worker that runs it; it is not run again. Check the action and its params, then retry the job; CPA_LOST_LEASE_LIMIT sets how many lost workers a ToDo may cost (now %s).',
                          v_limit, v_limit)
              from unnest(v_spent)));
  end if;
  return v_count + coalesce(array_length(v_spent, 1), 0);
end;
$$;
-- COMMENT on FUNCTION private.todo_expire_v3(p_limit integer)
COMMENT ON FUNCTION private.todo_expire_v3(p_limit integer) IS 'Requeue ToDos whose lease expired (a lost worker: counted in lost_leases, not against max_attempts), fail those that reached the lost-lease limit, cancel those whose job has ended; takes their jobs'' gates and rows without waiting, leaving held jobs to a later pass.';
-- ACL on FUNCTION private.todo_expire_v3(p_limit integer)
REVOKE ALL ON FUNCTION private.todo_expire_v3(p_limit integer) FROM PUBLIC;

-- FUNCTION private.todo_jobs_gate_v1(uuid[], boolean)
CREATE FUNCTION private.todo_jobs_gate_v1(p_todo_ids uuid[], p_exclusive boolean) RETURNS uuid[]
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    AS $$
declare
  v_user boolean := private.caller_is_user_v1();
  v_jobs uuid[];
begin
  select coalesce(array_agg(distinct t.job_id), '{}') into v_jobs
    from public.todos t
   where t.id = any(p_todo_ids)
     and (not v_user or t.tenant_id in (select private.user_tenant_ids_v1()));
  if p_exclusive then
    perform cpa.job_gate_v1(v_jobs);
  else
    perform cpa.job_gate_v1('{}', v_jobs);
  end if;
  return v_jobs;
end;
$$;
-- COMMENT on FUNCTION private.todo_jobs_gate_v1(p_todo_ids uuid[], p_exclusive boolean)
COMMENT ON FUNCTION private.todo_jobs_gate_v1(p_todo_ids uuid[], p_exclusive boolean) IS 'Take the gates (exclusive or shared) of the jobs of these ToDos; answers those jobs.';
-- ACL on FUNCTION private.todo_jobs_gate_v1(p_todo_ids uuid[], p_exclusive boolean)
REVOKE ALL ON FUNCTION private.todo_jobs_gate_v1(p_todo_ids uuid[], p_exclusive boolean) FROM PUBLIC;

-- FUNCTION private.todo_jobs_lock_v1(uuid[])
CREATE FUNCTION private.todo_jobs_lock_v1(p_todo_ids uuid[]) RETURNS uuid[]
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    AS $$
declare
  v_jobs uuid[];
begin
  v_jobs := private.todo_jobs_gate_v1(p_todo_ids, true);
  select array_agg(l.id order by l.id) into v_jobs
    from (select j.id from public.jobs j where j.id = any(v_jobs)
           order by j.id for no key update) l;
  return coalesce(v_jobs, '{}');
end;
$$;
-- COMMENT on FUNCTION private.todo_jobs_lock_v1(p_todo_ids uuid[])
COMMENT ON FUNCTION private.todo_jobs_lock_v1(p_todo_ids uuid[]) IS 'Lock the job rows of these ToDos (FOR NO KEY UPDATE, ascending id) and return their ids: step 1 of the lock order.';
-- ACL on FUNCTION private.todo_jobs_lock_v1(p_todo_ids uuid[])
REVOKE ALL ON FUNCTION private.todo_jobs_lock_v1(p_todo_ids uuid[]) FROM PUBLIC;

-- FUNCTION private.todos_reset_agent_notice_v1()
CREATE FUNCTION private.todos_reset_agent_notice_v1() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path TO ''
    AS $$
begin
  new.agent_noticed_at := null;
  return new;
end;
$$;
-- ACL on FUNCTION private.todos_reset_agent_notice_v1()
REVOKE ALL ON FUNCTION private.todos_reset_agent_notice_v1() FROM PUBLIC;

-- FUNCTION private.todos_start_v1()
CREATE FUNCTION private.todos_start_v1() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path TO ''
    AS $$
begin
  if new.run_at is not null and new.run_after < new.run_at then
    new.run_after := new.run_at;
  end if;
  if new.status = 'ready' then
    new.parked := new.run_after > now();
  end if;
  return new;
end;
$$;
-- COMMENT on FUNCTION private.todos_start_v1()
COMMENT ON FUNCTION private.todos_start_v1() IS 'A ToDo never starts before its run_at (run_after is raised to it), and one that is ready but not yet due is parked: the claims'' index leaves it out until a claim finds it due.';
-- ACL on FUNCTION private.todos_start_v1()
REVOKE ALL ON FUNCTION private.todos_start_v1() FROM PUBLIC;

-- CHECK CONSTRAINT public.agents agents_actions_count
ALTER TABLE public.agents
    ADD CONSTRAINT agents_actions_count CHECK ((cardinality(actions) <= 200)) NOT VALID;

-- CHECK CONSTRAINT public.agents agents_name_length
ALTER TABLE public.agents
    ADD CONSTRAINT agents_name_length CHECK ((length(name) <= 200)) NOT VALID;

-- TRIGGER public.todos todos_reset_agent_notice
CREATE TRIGGER todos_reset_agent_notice BEFORE UPDATE OF status ON public.todos FOR EACH ROW WHEN (((old.status = ANY (ARRAY['failed'::text, 'cancelled'::text])) AND (new.status = ANY (ARRAY['waiting'::text, 'confirming'::text, 'ready'::text])) AND (old.agent_noticed_at IS NOT NULL))) EXECUTE FUNCTION private.todos_reset_agent_notice_v1();

-- TRIGGER public.todos todos_start
CREATE TRIGGER todos_start BEFORE INSERT OR UPDATE OF status, run_after, run_at ON public.todos FOR EACH ROW WHEN (((new.run_at IS NOT NULL) OR (new.status = 'ready'::text))) EXECUTE FUNCTION private.todos_start_v1();

-- FK CONSTRAINT public.agents agents_tenant_id_fkey
ALTER TABLE ONLY public.agents
    ADD CONSTRAINT agents_tenant_id_fkey FOREIGN KEY (tenant_id) REFERENCES public.tenants(id) ON DELETE CASCADE;

-- POLICY public.agents Agents are visible to their user and the tenant's admins
CREATE POLICY "Agents are visible to their user and the tenant's admins" ON public.agents FOR SELECT TO authenticated USING (((tenant_id IN ( SELECT private.user_admin_tenant_ids_v1() AS user_admin_tenant_ids_v1)) OR ((created_by = ( SELECT auth.uid() AS uid)) AND (tenant_id IN ( SELECT private.user_tenant_ids_v1() AS user_tenant_ids_v1)))));
