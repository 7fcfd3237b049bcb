-- Each user's own, and work pushed to the desktop (issue 21).
--
-- A job belongs to the user who made it (jobs.created_by; a schedule's jobs to the schedule's
-- creator). Until now every member of a tenant read every member's jobs, ToDos, events and
-- schedules, joined the one Realtime topic that carried all of them, and any desktop agent of
-- the tenant claimed any member's desktop ToDos, under any agent id.
--
-- Visibility (RLS, not the routes): a member sees the jobs, ToDos, events, schedules and agents
-- they created; the tenant's owners and admins see all of the tenant's
-- (private.user_admin_tenant_ids_v1). The audit log: owners and admins, and each member the
-- entries of what they did.
--
-- Realtime topics (private broadcast; private.realtime_topic_allowed_v1 decides the join):
--   tenant:<tenant_id>:user:<user_id>    event job_events, {"events": [...]}: the events of the
--                                        jobs that user owns; that user, and owners/admins.
--   tenant:<tenant_id>                   event job_events: every event of the tenant; owners
--                                        and admins only.
--   tenant:<tenant_id>:agents:<user_id>  event todo_ready, {"todo_id", "job_id", "action"} (never
--                                        the params): wakes that user's desktop agents; that
--                                        user only.
-- The events flush (job_events_flush_v4) and cpa.job_submit_v3 send each batch to the tenant
-- topic and to the owner's user topic; private.todos_events_v2 sends todo_ready (and NOTIFYs
-- cpa_desktop_ready with '<tenant_id>:<user_id>', which serve's long-polling claims wait on)
-- when a desktop ToDo becomes ready to run. Same signatures, so replaced in place.
--
-- Agents: an agent id is bound to the user who first registers it in the tenant
-- (agents.created_by; private.agent_bind_v1). Another user's token using it raises CP403 (the
-- API answers 403) and changes nothing. cpa.agent_claim_v2 claims only ToDos of jobs whose
-- creator is the agent's user. A claim or heartbeat writes nothing unless something changed:
-- last_seen_at only when older than 45 s (an idle Realtime agent checks in once a minute, a
-- long-polling one every 20 s; online means seen in the last 90 s), actions or name only when
-- they differ. The audit log gets one slim entry per desktop ToDo status change made by or
-- under an agent's lease (private.todo_agent_audit_v1): which agent, whose desktop.

-- helpers --------------------------------------------------------------------------------------
create function private.user_admin_tenant_ids_v1()
returns setof uuid
language sql stable security definer set search_path = ''
as $$
  select m.tenant_id from public.memberships m
   where m.user_id = (select auth.uid()) and m.role in ('owner', 'admin')
$$;
comment on function private.user_admin_tenant_ids_v1() is 'Tenant ids where the calling user (auth.uid()) is an owner or admin: they see all of the tenant''s jobs.';
revoke execute on function private.user_admin_tenant_ids_v1() from public, anon;
grant execute on function private.user_admin_tenant_ids_v1() to authenticated, service_role;

-- Whether the caller may read a job: its creator (while a member) or an owner/admin of its
-- tenant; privileged callers (service role, login roles) always.
create function private.job_visible_v1(p_job_id uuid)
returns boolean
language sql stable security definer set search_path = ''
as $$
  select not private.caller_is_user_v1()
      or exists (select 1 from public.jobs j
                  where j.id = p_job_id
                    and ((j.created_by = (select auth.uid())
                          and j.tenant_id in (select private.user_tenant_ids_v1()))
                         or j.tenant_id in (select private.user_admin_tenant_ids_v1())))
$$;
comment on function private.job_visible_v1(uuid) is 'The caller may read the job: its creator, an owner or admin of its tenant, or a privileged role.';
revoke execute on function private.job_visible_v1(uuid) from public, anon;
grant execute on function private.job_visible_v1(uuid) to authenticated, service_role;

-- Realtime: may the caller join this topic (see the header)?
create function private.realtime_topic_allowed_v1(p_topic text)
returns boolean
language plpgsql stable security definer set search_path = ''
as $$
declare
  v_uuid constant text := '[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}';
  v_parts text[];
  v_role text;
begin
  if p_topic is null or p_topic !~ ('^tenant:' || v_uuid || '(:(user|agents):' || v_uuid || ')?$') then
    return false;
  end if;
  v_parts := string_to_array(p_topic, ':');
  select m.role into v_role from public.memberships m
   where m.tenant_id = v_parts[2]::uuid and m.user_id = (select auth.uid());
  if v_role is null then
    return false;
  end if;
  if cardinality(v_parts) = 2 then
    return v_role in ('owner', 'admin');
  end if;
  if v_parts[3] = 'user' then
    return v_parts[4]::uuid = (select auth.uid()) or v_role in ('owner', 'admin');
  end if;
  return v_parts[4]::uuid = (select auth.uid());  -- agents: the user's own desktops only
end;
$$;
comment on function private.realtime_topic_allowed_v1(text) is 'Realtime join rule: tenant:<t> for owners/admins; tenant:<t>:user:<u> for u and owners/admins; tenant:<t>:agents:<u> for u only.';
revoke execute on function private.realtime_topic_allowed_v1(text) from public, anon;
grant execute on function private.realtime_topic_allowed_v1(text) to authenticated, service_role;

-- agents ---------------------------------------------------------------------------------------
-- The agent row for (tenant, key), bound to the caller's user on first use; CP403 when another
-- user holds it. Writes only what changed: a new agent, a first binding, new actions or name,
-- or last_seen_at older than 45 s. p_actions null: keep the stored ones.
create function private.agent_bind_v1(
  p_tenant_id uuid, p_agent_key text, p_actions text[], p_name text
) returns public.agents
language plpgsql security definer set search_path = ''
as $$
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
comment on function private.agent_bind_v1 is 'The agent row of (tenant, key), registered to and bound to the calling user on first use; CP403 if another user holds the key. Writes only what changed (last_seen_at when older than 45 s).';
revoke execute on function private.agent_bind_v1(uuid, text, text[], text) from public, anon, authenticated, service_role;

-- Reports under an agent key: CP403 when the key belongs to another user in one of the
-- caller's tenants. Nothing to check for privileged callers.
create function private.agent_key_check_v1(p_agent_key text)
returns void
language plpgsql stable security definer set search_path = ''
as $$
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
end;
$$;
comment on function private.agent_key_check_v1(text) is 'Raise CP403 when an end user reports under an agent id another user of their tenant holds.';
revoke execute on function private.agent_key_check_v1(text) from public, anon, authenticated, service_role;

create or replace function cpa.agent_upsert_v1(
  p_tenant_id uuid, p_agent_key text, p_name text, p_actions text[]
) returns public.agents
language plpgsql security definer set search_path = ''
as $$
begin
  return private.agent_bind_v1(p_tenant_id, p_agent_key, coalesce(p_actions, '{}'), p_name);
end;
$$;
comment on function cpa.agent_upsert_v1 is 'Register an agent (an offer): bound to the calling user on first use, CP403 if another user holds the id; writes only what changed.';
revoke execute on function cpa.agent_upsert_v1(uuid, text, text, text[]) from public, anon;
grant execute on function cpa.agent_upsert_v1(uuid, text, text, text[]) to authenticated, service_role;

-- The claim: the ready desktop ToDos of the agent's user's jobs, for the actions it offers,
-- pinned ones only to it; otherwise as todo_claim_v2 did for one tenant (reclaim expired
-- leases first, lease, start pending jobs under SKIP LOCKED).
create or replace function cpa.agent_claim_v2(
  p_tenant_id uuid, p_agent_key text, p_actions text[], p_limit integer,
  p_lease_seconds double precision default 300
) returns setof public.todos
language plpgsql security definer set search_path = ''
as $$
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
  perform private.todo_expire_v1(100);
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
comment on function cpa.agent_claim_v2 is 'A desktop agent claims the ready desktop ToDos of its user''s jobs for the actions it offers, leased to private.agent_owner_v1(p_agent_key); the agent id is bound to its first user (CP403 for another).';
revoke execute on function cpa.agent_claim_v2(uuid, text, text[], integer, double precision) from public, anon;
grant execute on function cpa.agent_claim_v2(uuid, text, text[], integer, double precision) to authenticated, service_role;

-- The previous deploy's claim takes the same rule.
create or replace function cpa.agent_claim_v1(
  p_tenant_id uuid, p_agent_key text, p_actions text[], p_limit integer,
  p_lease_seconds double precision default 300
) returns setof public.todos
language sql security definer set search_path = ''
as $$
  select * from cpa.agent_claim_v2(p_tenant_id, p_agent_key, p_actions, p_limit, p_lease_seconds)
$$;
comment on function cpa.agent_claim_v1 is 'cpa.agent_claim_v2 (kept for the previous deploy).';
revoke execute on function cpa.agent_claim_v1(uuid, text, text[], integer, double precision) from public, anon;
grant execute on function cpa.agent_claim_v1(uuid, text, text[], integer, double precision) to authenticated, service_role;

create or replace function cpa.agent_complete_v1(p_agent_key text, p_items jsonb)
returns integer
language plpgsql security definer set search_path = ''
as $$
begin
  perform private.agent_key_check_v1(p_agent_key);
  return cpa.todo_complete_v1(private.agent_items_v1(p_agent_key, p_items));
end;
$$;
comment on function cpa.agent_complete_v1 is 'cpa.todo_complete_v1 for the ToDos the agent holds (owner private.agent_owner_v1(p_agent_key)); CP403 under another user''s agent id.';
revoke execute on function cpa.agent_complete_v1(text, jsonb) from public, anon;
grant execute on function cpa.agent_complete_v1(text, jsonb) to authenticated, service_role;

create or replace function cpa.agent_fail_v1(
  p_agent_key text, p_items jsonb, p_backoff_base double precision default 1.0
) returns integer
language plpgsql security definer set search_path = ''
as $$
begin
  perform private.agent_key_check_v1(p_agent_key);
  return cpa.todo_fail_v1(private.agent_items_v1(p_agent_key, p_items), p_backoff_base);
end;
$$;
comment on function cpa.agent_fail_v1 is 'cpa.todo_fail_v1 for the ToDos the agent holds (owner private.agent_owner_v1(p_agent_key)); CP403 under another user''s agent id.';
revoke execute on function cpa.agent_fail_v1(text, jsonb, double precision) from public, anon;
grant execute on function cpa.agent_fail_v1(text, jsonb, double precision) to authenticated, service_role;

create or replace function cpa.agent_release_v1(
  p_agent_key text, p_items jsonb, p_refusal boolean default false, p_max_refusals integer default 3
) returns integer
language plpgsql security definer set search_path = ''
as $$
begin
  perform private.agent_key_check_v1(p_agent_key);
  return cpa.todo_release_v1(private.agent_items_v1(p_agent_key, p_items), p_refusal, p_max_refusals);
end;
$$;
comment on function cpa.agent_release_v1 is 'cpa.todo_release_v1 for the ToDos the agent holds (owner private.agent_owner_v1(p_agent_key)); CP403 under another user''s agent id.';
revoke execute on function cpa.agent_release_v1(text, jsonb, boolean, integer) from public, anon;
grant execute on function cpa.agent_release_v1(text, jsonb, boolean, integer) to authenticated, service_role;

-- An agent's note on a ToDo: only on ToDos of jobs the caller may read.
create or replace function cpa.todo_note_v1(p_todo_id uuid, p_kind text, p_data jsonb)
returns bigint
language plpgsql security definer set search_path = ''
as $$
declare
  v_todo public.todos;
  v_id bigint;
begin
  select * into v_todo from public.todos t where t.id = p_todo_id;
  if not found or not private.job_visible_v1(v_todo.job_id) then
    raise exception 'not found' using errcode = 'P0002', hint = 'It does not exist or is not visible to you.';
  end if;
  perform private.tenant_authorize_v1(v_todo.tenant_id);
  if p_kind not in ('agent.agree', 'agent.inform', 'agent.refuse', 'notification') then
    raise exception 'The note kind % is not one an agent may record.', p_kind using errcode = '22023';
  end if;
  if octet_length(p_data::text) > 65536 then
    raise exception 'A note holds at most 64 KiB of JSON; this one has % bytes.', octet_length(p_data::text)
      using errcode = '22023';
  end if;
  insert into public.job_events (tenant_id, job_id, todo_id, kind, status, data)
  values (v_todo.tenant_id, v_todo.job_id, v_todo.id, p_kind, v_todo.status, coalesce(p_data, '{}'::jsonb))
  returning id into v_id;
  return v_id;
end;
$$;
comment on function cpa.todo_note_v1 is 'Record an agent''s note (agree, inform, refuse, notification) on a ToDo of a job the caller may read.';
revoke execute on function cpa.todo_note_v1(uuid, text, jsonb) from public, anon;
grant execute on function cpa.todo_note_v1(uuid, text, jsonb) to authenticated, service_role;

-- An Idempotency-Key replays its job only for a caller who may read that job: another member
-- repeating a key gets 409, not the other user's job.
create or replace function cpa.idempotency_check_v1(p_tenant_id uuid, p_key text, p_body_hash text)
returns boolean
language plpgsql security definer set search_path = ''
as $$
declare
  v_hash text;
  v_job uuid;
begin
  perform private.tenant_authorize_v1(p_tenant_id);
  insert into private.job_idempotency (tenant_id, key, body_hash)
  values (p_tenant_id, p_key, p_body_hash)
  on conflict (tenant_id, key) do nothing;
  if found then
    return true;
  end if;
  select i.body_hash into v_hash from private.job_idempotency i
   where i.tenant_id = p_tenant_id and i.key = p_key;
  if v_hash is distinct from p_body_hash then
    raise exception 'The Idempotency-Key % was first used with a different body; send the original body to get that job again, or use a new key for a new job.', left(p_key, 200)
      using errcode = '55000';
  end if;
  select j.id into v_job from public.jobs j where j.tenant_id = p_tenant_id and j.idempotency_key = p_key;
  if v_job is not null and not private.job_visible_v1(v_job) then
    raise exception 'The Idempotency-Key % belongs to another user''s job; use a new key.', left(p_key, 200)
      using errcode = '55000';
  end if;
  return false;
end;
$$;
comment on function cpa.idempotency_check_v1 is 'Record the body hash of a new Idempotency-Key; true when new, false for a replay, 55000 for a different body or another user''s job.';
revoke execute on function cpa.idempotency_check_v1(uuid, text, text) from public, anon;
grant execute on function cpa.idempotency_check_v1(uuid, text, text) to authenticated, service_role;

-- The audit entry of a desktop ToDo's status change under an agent's lease: which agent and
-- whose desktop ran it (slim: no params, no result).
create function private.todo_agent_audit_v1()
returns trigger
language plpgsql security definer set search_path = ''
as $$
declare
  v_key text := substr(coalesce(new.lease_owner, old.lease_owner), 7);
begin
  insert into public.audit_log (tenant_id, actor_id, actor_role, action, entity, entity_id, before, after)
  values (
    new.tenant_id,
    (select auth.uid()),
    coalesce((select auth.role()), nullif(current_setting('role', true), 'none'), session_user),
    'UPDATE', 'todos', new.id::text,
    jsonb_build_object('status', old.status),
    jsonb_build_object(
      'status', new.status, 'job_id', new.job_id, 'action', new.action, 'attempts', new.attempts,
      'agent', v_key,
      'agent_user', (select a.created_by from public.agents a
                      where a.tenant_id = new.tenant_id and a.agent_key = v_key)));
  return null;
end;
$$;
comment on function private.todo_agent_audit_v1() is 'Audit a desktop ToDo''s status change under an agent lease: the agent key and the user whose desktop it is.';
revoke execute on function private.todo_agent_audit_v1() from public, anon, authenticated, service_role;

-- wake-ups -------------------------------------------------------------------------------------
-- A desktop ToDo became ready: wake its job owner's agents (Realtime todo_ready on
-- tenant:<t>:agents:<u>, without params) and serve's waiting claims (NOTIFY cpa_desktop_ready).
create function private.agent_wake_v1(p_todo_ids uuid[])
returns void
language plpgsql security definer set search_path = ''
as $$
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
comment on function private.agent_wake_v1(uuid[]) is 'Wake the job owner''s desktop agents for ToDos that became ready: Realtime todo_ready on tenant:<t>:agents:<u> and NOTIFY cpa_desktop_ready ''<t>:<u>''.';
revoke execute on function private.agent_wake_v1(uuid[]) from public, anon, authenticated, service_role;

create or replace function private.todos_events_v2()
returns trigger
language plpgsql security definer set search_path = ''
as $$
declare
  v_direct text := coalesce(current_setting('cpa.events_direct', true), '');
begin
  if not exists (select 1 from new_rows) then
    return null;
  end if;
  if tg_op = 'INSERT' then
    if v_direct = '' or exists (select 1 from new_rows n where n.job_id::text <> v_direct) then
      perform private.job_events_stage_v1(array(
        select row(n.tenant_id, n.job_id, n.id, 'todo.status', n.status,
                   jsonb_build_object('key', n.key, 'action', n.action, 'target', n.target),
                   now())::private.job_event_draft
          from new_rows n where n.job_id::text is distinct from nullif(v_direct, '')
         order by n.id));
    end if;
    if exists (select 1 from new_rows where status = 'ready') then
      perform pg_notify('cpa_todo_ready', 'insert');
      if exists (select 1 from new_rows n
                  where n.status = 'ready' and n.target = 'desktop' and n.run_after <= now()) then
        perform private.agent_wake_v1(array(
          select n.id from new_rows n
           where n.status = 'ready' and n.target = 'desktop' and n.run_after <= now()));
      end if;
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
      if exists (select 1 from new_rows n join old_rows o on o.id = n.id
                  where n.status = 'ready' and o.status is distinct from 'ready'
                    and n.target = 'desktop' and n.run_after <= now()) then
        perform private.agent_wake_v1(array(
          select n.id from new_rows n join old_rows o on o.id = n.id
           where n.status = 'ready' and o.status is distinct from 'ready'
             and n.target = 'desktop' and n.run_after <= now()));
      end if;
    end if;
  end if;
  return null;
end;
$$;
comment on function private.todos_events_v2 is 'Stage ToDo status events and notify cpa_todo_ready, except for the inserted ToDos of the job cpa.job_submit_v3 is creating (cpa.events_direct); desktop ToDos that became ready wake their job owner''s agents (private.agent_wake_v1).';
revoke execute on function private.todos_events_v2() from public, anon, authenticated, service_role;

create or replace function private.job_events_flush_v4()
returns trigger
language plpgsql security definer set search_path = ''
as $$
declare
  v_tx constant xid8 := pg_current_xact_id();
  v_jobs uuid[];
  v_gone uuid[];
  v_owned uuid[];
  v_owners uuid[];
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
  -- Each job's owner (its user topic) in the same probe that finds deleted jobs.
  select array_agg(j.id) filter (where x.id is null),
         array_agg(j.id) filter (where x.created_by is not null),
         array_agg(x.created_by) filter (where x.created_by is not null)
    into v_gone, v_owned, v_owners
    from unnest(v_jobs) j(id) left join public.jobs x on x.id = j.id;
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
  ), ev as (
    select i.tenant_id, i.id, o.user_id,
           jsonb_build_object('id', i.id, 'job_id', i.job_id, 'todo_id', i.todo_id,
                              'kind', i.kind, 'status', i.status, 'data', i.data,
                              'created_at', i.created_at) as event
      from ins i left join unnest(v_owned, v_owners) o(job_id, user_id) on o.job_id = i.job_id
  ), whole as (
    -- Each event goes to its tenant's topic and to its job owner's user topic: one pass over
    -- the events, aggregated per tenant and per (tenant, owner). Usually a topic's events fit
    -- one message: no per-event size and no window. Only a topic whose events pass 100 kB is
    -- cut by size, as in _v2 (an event starts a new message once the events before it reach
    -- another 100 kB).
    select 'tenant:' || e.tenant_id::text
           || case when grouping(e.user_id) = 0 then ':user:' || e.user_id::text else '' end
             as topic,
           jsonb_agg(e.event order by e.id) as events
      from ev e
     group by grouping sets ((e.tenant_id), (e.tenant_id, e.user_id))
    having grouping(e.user_id) = 1 or e.user_id is not null
  ), msg as (
    select w.topic, 0::bigint as chunk, w.events
      from whole w where pg_column_size(w.events) <= 100000
    union all
    select c.topic, c.chunk, jsonb_agg(c.event order by c.id)
    from (
      select t.topic, t.id, t.event,
             coalesce(sum(pg_column_size(t.event)) over (
               partition by t.topic order by t.id
               rows between unbounded preceding and 1 preceding), 0) / 100000 as chunk
      from (select d.topic, e.id, e.event
              from ev e
              cross join lateral (values ('tenant:' || e.tenant_id::text),
                                         ('tenant:' || e.tenant_id::text || ':user:'
                                          || e.user_id::text)) d(topic)
             -- A one-time filter: without a message over 100 kB nothing here runs.
             where exists (select 1 from whole w where pg_column_size(w.events) > 100000)
               and d.topic is not null) t
     where t.topic in (select w.topic from whole w where pg_column_size(w.events) > 100000)
    ) c
    group by c.topic, c.chunk
  )
  select array_agg(m.topic order by m.topic, m.chunk),
         array_agg(jsonb_build_object('events', m.events) order by m.topic, m.chunk)
    into v_topics, v_payloads
    from msg m;
  perform set_config('cpa.events_flushing', 'off', true);

  for i in 1 .. coalesce(cardinality(v_topics), 0) loop
    perform realtime.send(v_payloads[i], 'job_events', v_topics[i], true);
  end loop;
  return null;
end;
$$;
comment on function private.job_events_flush_v4 is 'At commit: lock the transaction''s job buckets (advisory, sorted, at most 1024, in one statement), give its staged events their ids in job_events, and broadcast them once per topic: tenant:<t> (all) and tenant:<t>:user:<job owner> (cut by size only past 100 kB).';
revoke execute on function private.job_events_flush_v4() from public, anon, authenticated, service_role;
alter function private.job_events_flush_v4() set plan_cache_mode = force_generic_plan;

create or replace function cpa.job_submit_v3(
  p_tenant_id uuid,
  p_request text,
  p_intent text,
  p_todos jsonb,
  p_idempotency_key text default null,
  p_priority integer default 0,
  p_max_retries integer default 3,
  p_run_at timestamptz default null,
  p_time_zone text default 'UTC',
  p_traceparent text default null,
  p_rate_limit integer default null,
  p_rate_window integer default 60
) returns jsonb
language plpgsql security definer set search_path = '' set "TimeZone" = 'UTC'
as $$
declare
  v_tenant uuid := p_tenant_id;
  v_id uuid := gen_random_uuid();
  v_direct boolean;
  v_job public.jobs;
  v_todos jsonb;
  v_events jsonb;
  v_edges integer;
  v_expected integer;
  v_key text;
  v_start timestamptz;
  v_hits integer;
begin
  if p_idempotency_key is not null then
    -- A keyed request may answer an earlier job: v1 keeps that path (as v2).
    v_todos := cpa.job_submit_v1(p_tenant_id, p_request, p_intent, p_todos, p_idempotency_key,
                                 p_priority, p_max_retries, p_run_at, p_time_zone, p_traceparent,
                                 p_rate_limit, p_rate_window);
    if not private.job_visible_v1((v_todos ->> 'id')::uuid) then
      raise exception 'The Idempotency-Key % belongs to another user''s job; use a new key.', left(p_idempotency_key, 200)
        using errcode = '55000';
    end if;
    return v_todos || jsonb_build_object(
      'created_by', (select j.created_by from public.jobs j where j.id = (v_todos ->> 'id')::uuid));
  end if;
  if v_tenant is null then
    select m.tenant_id into v_tenant from public.memberships m
     where m.user_id = (select auth.uid())
     order by m.created_at, m.tenant_id limit 1;
    if v_tenant is null then
      raise exception 'not found' using errcode = 'P0002',
        hint = 'You are not a member of any tenant; ask an owner to add you (local mode: cpa-scheduler token --tenant NAME --user NAME).';
    end if;
  else
    perform private.tenant_authorize_v1(v_tenant);
  end if;
  if jsonb_typeof(p_todos) is distinct from 'array' or jsonb_array_length(p_todos) = 0 then
    raise exception 'A job needs a non-empty array of ToDos.' using errcode = '22023';
  end if;

  -- Small jobs write their events here (see the header); larger ones are staged as before.
  v_direct := jsonb_array_length(p_todos) <= 100;
  if v_direct then
    perform set_config('cpa.events_direct', v_id::text, true);
  end if;

  insert into public.jobs (id, tenant_id, created_by, request, intent, priority, todo_count,
                           max_retries, run_at, time_zone, traceparent)
  values (v_id, v_tenant, (select auth.uid()), p_request, p_intent, p_priority,
          jsonb_array_length(p_todos), p_max_retries, p_run_at, coalesce(p_time_zone, 'UTC'),
          p_traceparent)
  returning * into v_job;

  -- As v2: each ToDo with all of its columns at once, the answer from the inserted rows; and,
  -- on the direct path, the events in the same statement: the job's first, then the ToDos' in
  -- id order (the order the triggers staged them in), ids from the sequence in that order.
  with ins as (
    insert into public.todos (job_id, tenant_id, key, position, action, target, params, status,
                              priority, max_attempts, requires_confirmation, deps_remaining,
                              run_at, agent_timeout_seconds, optional)
    select v_job.id, v_tenant, x.key, e.n::integer, x.action, coalesce(x.target, 'cloud'),
           coalesce(x.params, '{}'::jsonb),
           case when coalesce(jsonb_array_length(x.depends_on), 0) > 0 then 'waiting'
                when coalesce(x.requires_confirmation, false) then 'confirming'
                else 'ready' end,
           p_priority, coalesce(x.max_attempts, 3), coalesce(x.requires_confirmation, false),
           coalesce(jsonb_array_length(x.depends_on), 0),
           greatest(p_run_at, x.run_at), x.agent_timeout, coalesce(x.optional, false)
      from jsonb_array_elements(p_todos) with ordinality as e(item, n)
      cross join lateral jsonb_to_record(e.item) as x(key text, action text, target text,
                                                     params jsonb, depends_on jsonb,
                                                     max_attempts integer,
                                                     requires_confirmation boolean,
                                                     run_at timestamptz, agent_timeout integer,
                                                     optional boolean)
    returning *
  ), ev as (
    insert into public.job_events (tenant_id, job_id, todo_id, kind, status, data, created_at)
    select x.tenant_id, x.job_id, x.todo_id, x.kind, x.status, x.data, now()
      from (select 0 as o, null::uuid as todo_id, v_tenant as tenant_id, v_job.id as job_id,
                   'job.status' as kind, v_job.status as status,
                   jsonb_build_object('intent', v_job.intent) as data
             where v_direct
            union all
            select 1, t.id, t.tenant_id, t.job_id, 'todo.status', t.status,
                   jsonb_build_object('key', t.key, 'action', t.action, 'target', t.target)
              from ins t
             where v_direct) x
     order by x.o, x.todo_id
    returning *
  )
  select (select jsonb_agg(jsonb_build_object(
            'id', t.id, 'key', t.key, 'action', t.action, 'target', t.target,
            'status', t.status,
            -- The item's own keys, as v1 read them back from the edges: sorted, each once.
            'depends_on', coalesce((select jsonb_agg(distinct d.key order by d.key)
                                      from jsonb_array_elements_text(
                                             case when jsonb_typeof(p_todos -> (t.position - 1) -> 'depends_on') = 'array'
                                                  then p_todos -> (t.position - 1) -> 'depends_on' end) as d(key)),
                                   '[]'::jsonb),
            'params', t.params, 'result', t.result, 'error', t.error,
            'attempts', t.attempts, 'started_at', t.started_at,
            'finished_at', t.finished_at,
            'requires_confirmation', t.requires_confirmation,
            'run_at', t.run_at)
          order by t.position) from ins t),
         (select jsonb_agg(jsonb_build_object('id', i.id, 'job_id', i.job_id,
                                              'todo_id', i.todo_id, 'kind', i.kind,
                                              'status', i.status, 'data', i.data,
                                              'created_at', i.created_at)
                           order by i.id) from ev i)
    into v_todos, v_events;

  insert into public.todo_edges (todo_id, depends_on_id, tenant_id)
  select c.id, p.id, v_tenant
  from jsonb_to_recordset(p_todos) as x(key text, depends_on jsonb)
  cross join lateral jsonb_array_elements_text(coalesce(x.depends_on, '[]'::jsonb)) as d(dep)
  join public.todos c on c.job_id = v_job.id and c.key = x.key
  join public.todos p on p.job_id = v_job.id and p.key = d.dep;
  get diagnostics v_edges = row_count;
  select coalesce(sum(jsonb_array_length(coalesce(x.depends_on, '[]'::jsonb))), 0)::integer
    into v_expected
  from jsonb_to_recordset(p_todos) as x(depends_on jsonb);
  if v_edges <> v_expected then
    raise exception 'A ToDo depends on a key that is not in the graph.' using errcode = '22023';
  end if;

  if p_rate_limit is not null then
    -- As v2: the fixed window of the rate limit, counted last.
    v_key := 'jobs:' || v_tenant::text;
    v_start := to_timestamp(floor(extract(epoch from now()) / p_rate_window) * p_rate_window);
    insert into private.rate_limits as r (key, window_start, hits)
    values (v_key, v_start, 1)
    on conflict (key, window_start) do update set hits = r.hits + 1
    returning r.hits into v_hits;
    if random() < 0.01 then
      delete from private.rate_limits r
       where r.window_start < now() - make_interval(secs => 2 * p_rate_window);
    end if;
    if v_hits > p_rate_limit then
      raise exception 'The tenant created more than % jobs in % seconds.', p_rate_limit, p_rate_window
        using errcode = 'CP429',
              detail = extract(epoch from (v_start + make_interval(secs => p_rate_window) - now()))::text;
    end if;
  end if;

  if v_direct then
    -- Anything later in this transaction is staged and flushed at commit again.
    perform set_config('cpa.events_direct', '', true);
    perform realtime.send(jsonb_build_object('events', v_events), 'job_events',
                          'tenant:' || v_tenant::text, true);
    if v_job.created_by is not null then
      perform realtime.send(jsonb_build_object('events', v_events), 'job_events',
                            'tenant:' || v_tenant::text || ':user:' || v_job.created_by::text, true);
    end if;
  end if;

  return jsonb_build_object(
    'id', v_job.id, 'tenant_id', v_job.tenant_id, 'created_by', v_job.created_by,
    'status', v_job.status,
    'request', v_job.request, 'intent', v_job.intent, 'error', v_job.error,
    'created_at', v_job.created_at,
    'started_at', v_job.started_at,
    'completed_at', v_job.completed_at,
    'run_at', v_job.run_at, 'schedule_id', v_job.schedule_id,
    'todos', v_todos);
end;
$$;
comment on function cpa.job_submit_v3 is 'POST /v1/jobs in one call (as job_submit_v2), writing the new job''s events and their Realtime broadcast (tenant and owner''s user topic) itself (jobs up to 100 ToDos) instead of staging them for the commit-time flush; the answer names created_by. Keyed requests go to job_submit_v1.';
revoke execute on function cpa.job_submit_v3(uuid, text, text, jsonb, text, integer, integer, timestamptz, text, text, integer, integer) from public, anon;
grant execute on function cpa.job_submit_v3(uuid, text, text, jsonb, text, integer, integer, timestamptz, text, text, integer, integer) to authenticated, service_role;

-- triggers -------------------------------------------------------------------------------------
-- Only desktop ToDos under an agent's lease reach the function (the WHEN runs per row in C).
create trigger todos_agent_audit
  after update of status on public.todos
  for each row
  when (new.target = 'desktop' and old.status is distinct from new.status
        and (new.lease_owner like 'agent:%' or old.lease_owner like 'agent:%'))
  execute function private.todo_agent_audit_v1();

-- policies -------------------------------------------------------------------------------------
-- "The tenant's admins" in the names below: its members with role owner or admin.
drop policy "Jobs are visible to members of their tenant" on public.jobs;
create policy "Jobs are visible to their creator and the tenant's admins"
  on public.jobs for select to authenticated
  using (
    tenant_id in (select private.user_admin_tenant_ids_v1())
    or (created_by = (select auth.uid()) and tenant_id in (select private.user_tenant_ids_v1()))
  );

drop policy "ToDos are visible to members of their tenant" on public.todos;
create policy "ToDos are visible with their job"
  on public.todos for select to authenticated
  using (
    tenant_id in (select private.user_admin_tenant_ids_v1())
    or exists (select 1 from public.jobs j
                where j.id = todos.job_id and j.created_by = (select auth.uid())
                  and j.tenant_id in (select private.user_tenant_ids_v1()))
  );

drop policy "Job events are visible to members of their tenant" on public.job_events;
create policy "Job events are visible with their job"
  on public.job_events for select to authenticated
  using (
    tenant_id in (select private.user_admin_tenant_ids_v1())
    or exists (select 1 from public.jobs j
                where j.id = job_events.job_id and j.created_by = (select auth.uid())
                  and j.tenant_id in (select private.user_tenant_ids_v1()))
  );

drop policy "Schedules are visible to members of their tenant" on public.schedules;
create policy "Schedules are visible to their creator and the tenant's admins"
  on public.schedules for select to authenticated
  using (
    tenant_id in (select private.user_admin_tenant_ids_v1())
    or (created_by = (select auth.uid()) and tenant_id in (select private.user_tenant_ids_v1()))
  );

drop policy "Agents are visible to members of their tenant" on public.agents;
create policy "Agents are visible to their user and the tenant's admins"
  on public.agents for select to authenticated
  using (
    tenant_id in (select private.user_admin_tenant_ids_v1())
    or (created_by = (select auth.uid()) and tenant_id in (select private.user_tenant_ids_v1()))
  );

-- The audit log holds requests and ToDo rows: a member reads the entries of what they did.
drop policy "Audit entries are visible to members of their tenant" on public.audit_log;
create policy "Audit entries are visible to the actor and the tenant's admins"
  on public.audit_log for select to authenticated
  using (
    tenant_id in (select private.user_admin_tenant_ids_v1())
    or (actor_id = (select auth.uid()) and tenant_id in (select private.user_tenant_ids_v1()))
  );

-- Realtime authorizes a private channel by selecting probe rows of the channel's topic with
-- realtime.topic() set to it; the row's own topic must be that topic (as since
-- 20261127000300_events_contract), and private.realtime_topic_allowed_v1 decides, once per
-- statement.
drop policy "Tenant members can receive their own tenant's broadcasts" on realtime.messages;
create policy "Members receive their own topics, admins their tenant's"
  on realtime.messages for select to authenticated
  using (
    realtime.messages.extension = 'broadcast'
    and realtime.messages.topic = (select realtime.topic())
    and (select private.realtime_topic_allowed_v1((select realtime.topic())))
  );
