-- Operations leave the exposed schema. `public` is what the Data API (PostgREST) serves, so a
-- volatile function there that `authenticated` may execute is an RPC endpoint that skips every
-- check of our API (graph validation, catalogue, bounds). The operations move to `cpa`, which
-- supabase/config.toml [api] schemas does not list; the API still calls them as
-- `authenticated` with the verified claims set, so RLS and the membership checks inside stay
-- the tenancy guard. Same names and signatures: only the schema changes.
-- Complete, fail and release are redefined: a missing owner used to mean "any owner", and an
-- end user could complete the dispatcher's cloud ToDos. Confirm no longer locks a row before
-- the tenant check, and "not yours" and "does not exist" now read the same everywhere.

create schema if not exists cpa;
comment on schema cpa is 'Operations (versioned SQL functions); not exposed through the Data API.';
revoke all on schema cpa from public;
grant usage on schema cpa to authenticated, service_role;

alter function public.job_create_v1(uuid, text, text, jsonb, text, integer, integer) set schema cpa;
alter function public.todo_claim_v1(text, text, integer, double precision, uuid, text[]) set schema cpa;
alter function public.todo_complete_v1(jsonb) set schema cpa;
alter function public.todo_fail_v1(jsonb, double precision) set schema cpa;
alter function public.todo_release_v1(jsonb, boolean, integer) set schema cpa;
alter function public.todo_snooze_v1(uuid, text, timestamptz) set schema cpa;
alter function public.todo_extend_v1(uuid[], text, double precision) set schema cpa;
alter function public.todo_confirm_v1(uuid, boolean) set schema cpa;
alter function public.job_cancel_v1(uuid) set schema cpa;
alter function public.job_retry_v1(uuid) set schema cpa;
alter function public.agent_upsert_v1(uuid, text, text, text[]) set schema cpa;
alter function public.agent_claim_v1(uuid, text, text[], integer, double precision) set schema cpa;
alter function public.todo_note_v1(uuid, text, jsonb) set schema cpa;
alter function public.job_route_v1(uuid, text) set schema cpa;
alter function public.rate_limit_hit_v1(uuid, integer, integer) set schema cpa;
alter function public.job_attach_v1(uuid, jsonb) set schema cpa;
alter function public.plan_cache_get_v1(uuid, text) set schema cpa;
alter function public.plan_cache_put_v1(uuid, text, jsonb, integer) set schema cpa;

-- Functions made before this migration that call a moved operation by its old name would
-- fail at their next call (plpgsql resolves names when it runs): they are re-created with the
-- cpa. names. Found by their source, whichever migration made them (another branch's migration
-- with an earlier timestamp, too), so the order in which branches merge does not matter.
do $$
declare
  v_oid oid;
  v_pattern constant text := 'public\.(job_create_v1|todo_claim_v1|todo_complete_v1|todo_fail_v1'
    '|todo_release_v1|todo_snooze_v1|todo_extend_v1|todo_confirm_v1|job_cancel_v1|job_retry_v1'
    '|agent_upsert_v1|agent_claim_v1|todo_note_v1|job_route_v1|rate_limit_hit_v1|job_attach_v1'
    '|plan_cache_get_v1|plan_cache_put_v1)(\s*\()';
begin
  for v_oid in
    select p.oid from pg_proc p join pg_namespace n on n.oid = p.pronamespace
     where n.nspname in ('public', 'private', 'cpa') and p.prokind = 'f'
       and p.prosrc ~ v_pattern
       and not exists (select 1 from pg_depend d where d.objid = p.oid and d.deptype = 'e')
  loop
    execute regexp_replace(pg_get_functiondef(v_oid), v_pattern, 'cpa.\1\2', 'g');
  end loop;
end;
$$;

-- One answer for "not yours" and "does not exist": a different hint would let ids be probed.
create or replace function private.tenant_authorize_v1(p_tenant_id uuid)
returns void
language plpgsql stable security definer set search_path = ''
as $$
begin
  if private.caller_is_user_v1()
     and not exists (
       select 1 from public.memberships m
       where m.tenant_id = p_tenant_id and m.user_id = (select auth.uid())
     ) then
    raise exception 'not found' using errcode = 'P0002', hint = 'It does not exist or is not visible to you.';
  end if;
end;
$$;

create or replace function private.job_authorized_v1(p_job_id uuid)
returns public.jobs
language plpgsql stable security definer set search_path = ''
as $$
declare
  v_job public.jobs;
begin
  select * into v_job from public.jobs j where j.id = p_job_id;
  if not found then
    raise exception 'not found' using errcode = 'P0002', hint = 'It does not exist or is not visible to you.';
  end if;
  perform private.tenant_authorize_v1(v_job.tenant_id);
  return v_job;
end;
$$;

-- agent claim: its body named public.todo_claim_v1, which has moved.
create or replace function cpa.agent_claim_v1(
  p_tenant_id uuid, p_agent_key text, p_actions text[], p_limit integer,
  p_lease_seconds double precision default 300
) returns setof public.todos
language plpgsql security definer set search_path = ''
as $$
begin
  perform private.tenant_authorize_v1(p_tenant_id);
  insert into public.agents (tenant_id, agent_key, actions, created_by)
  values (p_tenant_id, p_agent_key, coalesce(p_actions, '{}'), (select auth.uid()))
  on conflict (tenant_id, agent_key) do update set last_seen_at = now();
  return query
  select * from cpa.todo_claim_v1('desktop', 'agent:' || p_agent_key, least(p_limit, 50),
                                  least(greatest(p_lease_seconds, 5), 3600), p_tenant_id, p_actions);
end;
$$;

-- Who may report on a leased ToDo (complete, fail, release): the exact lease owner, never
-- "anyone" (a null owner matches nothing). End users act only as one of their desktop agents,
-- on desktop ToDos of their tenants; cloud ToDos belong to the dispatcher.

-- complete -------------------------------------------------------------------------------------
-- p_items: [{"id", "owner", "attempt"?, "result"}]
create or replace function cpa.todo_complete_v1(p_items jsonb)
returns integer
language plpgsql security definer set search_path = ''
as $$
declare
  v_done uuid[];
  v_jobs uuid[];
  v_user boolean := private.caller_is_user_v1();
begin
  with items as (
    select (i ->> 'id')::uuid as id, i ->> 'owner' as owner, (i ->> 'attempt')::integer as attempt,
           i -> 'result' as result
      from jsonb_array_elements(p_items) as i
  ), upd as (
    update public.todos t
       set status = 'done', result = items.result, error = null, finished_at = now(),
           updated_at = now(), lease_owner = null, lease_expires_at = null
      from items
     where t.id = items.id and t.status = 'running'
       and t.lease_owner = items.owner
       and t.attempts = coalesce(items.attempt, t.attempts)
       and (not v_user or (items.owner like 'agent:%' and t.target = 'desktop'
                           and t.tenant_id in (select private.user_tenant_ids_v1())))
    returning t.id, t.job_id
  )
  select array_agg(upd.id), array_agg(distinct upd.job_id) into v_done, v_jobs from upd;
  if v_done is null then
    return 0;
  end if;

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

  perform 1 from public.jobs j where j.id = any(v_jobs) order by j.id for no key update;
  with n as (
    select t.job_id, count(*)::integer as k from public.todos t where t.id = any(v_done) group by t.job_id
  )
  update public.jobs j
     set todos_done = j.todos_done + n.k,
         status = case when j.status = 'running' and j.todos_done + n.k >= j.todo_count then 'done'
                       else j.status end,
         completed_at = case when j.status = 'running' and j.todos_done + n.k >= j.todo_count
                             then now() else j.completed_at end
    from n
   where j.id = n.job_id;
  return array_length(v_done, 1);
end;
$$;

-- fail -----------------------------------------------------------------------------------------
-- p_items: [{"id", "owner", "attempt"?, "error", "retryable"}]
create or replace function cpa.todo_fail_v1(p_items jsonb, p_backoff_base double precision default 1.0)
returns integer
language plpgsql security definer set search_path = ''
as $$
declare
  v_ids uuid[];
  v_errors text[];
  v_retry boolean[];
  v_attempts integer[];
  v_retried integer;
  v_terminal uuid[];
  v_final text[];
  v_user boolean := private.caller_is_user_v1();
begin
  select array_agg(s.id), array_agg(s.error), array_agg(s.retry), array_agg(s.attempts)
    into v_ids, v_errors, v_retry, v_attempts
    from (
      select t.id, left(coalesce(i ->> 'error', 'unknown error'), 4000) as error,
             coalesce((i ->> 'retryable')::boolean, false) and t.attempts < t.max_attempts as retry,
             case when coalesce((i ->> 'retryable')::boolean, false) then t.attempts end as attempts
        from jsonb_array_elements(p_items) as i
        join public.todos t on t.id = (i ->> 'id')::uuid
       where t.status = 'running'
         and t.lease_owner = i ->> 'owner'
         and t.attempts = coalesce((i ->> 'attempt')::integer, t.attempts)
         and (not v_user or (i ->> 'owner' like 'agent:%' and t.target = 'desktop'
                             and t.tenant_id in (select private.user_tenant_ids_v1())))
       order by t.id
         for update of t
    ) s;
  if v_ids is null then
    return 0;
  end if;

  -- Exponential backoff: base * 2^(attempt-1) seconds, at most 10 minutes.
  update public.todos t
     set status = 'ready', error = u.error, lease_owner = null, lease_expires_at = null,
         run_after = now() + make_interval(secs => least(600, greatest(0, least(p_backoff_base, 60))
                                                             * power(2, t.attempts - 1))),
         updated_at = now()
    from unnest(v_ids, v_errors, v_retry) as u(id, error, retry)
   where t.id = u.id and u.retry;
  get diagnostics v_retried = row_count;

  select array_agg(u.id),
         array_agg(case when u.attempts is null then u.error
                        else format('%s (gave up after %s attempts)', u.error, u.attempts) end)
    into v_terminal, v_final
    from unnest(v_ids, v_errors, v_retry, v_attempts) as u(id, error, retry, attempts)
   where not u.retry;
  if v_terminal is not null then
    perform private.todo_fail_terminal_v1(v_terminal, v_final);
  end if;
  return v_retried + coalesce(array_length(v_terminal, 1), 0);
end;
$$;

-- release (refuse, shutdown) -------------------------------------------------------------------
create or replace function cpa.todo_release_v1(
  p_items jsonb, p_refusal boolean default false, p_max_refusals integer default 3
) returns integer
language plpgsql security definer set search_path = ''
as $$
declare
  v_released integer;
  v_spent uuid[];
  v_user boolean := private.caller_is_user_v1();
begin
  with items as (
    select (i ->> 'id')::uuid as id, i ->> 'owner' as owner from jsonb_array_elements(p_items) as i
  ), mine as (
    select t.id, t.refusals from public.todos t join items on items.id = t.id
     where t.status = 'running'
       and t.lease_owner = items.owner
       and (not v_user or (items.owner like 'agent:%' and t.target = 'desktop'
                           and t.tenant_id in (select private.user_tenant_ids_v1())))
     for update of t
  ), upd as (
    update public.todos t
       set status = 'ready', attempts = greatest(t.attempts - 1, 0),
           refusals = t.refusals + case when p_refusal then 1 else 0 end,
           lease_owner = null, lease_expires_at = null, run_after = now(), updated_at = now()
      from mine
     where t.id = mine.id and (not p_refusal or mine.refusals + 1 < p_max_refusals)
    returning t.id
  )
  select (select count(*) from upd)::integer,
         (select array_agg(m.id) from mine m where p_refusal and m.refusals + 1 >= p_max_refusals)
    into v_released, v_spent;
  if v_spent is not null then
    perform private.todo_fail_terminal_v1(
      v_spent,
      array(select format('Refused by %s agents; no agent will run it.', p_max_refusals)
              from unnest(v_spent)));
  end if;
  return v_released + coalesce(array_length(v_spent, 1), 0);
end;
$$;

-- confirm: read without a lock, check the tenant, and only then lock the row.
create or replace function cpa.todo_confirm_v1(p_todo_id uuid, p_approved boolean default true)
returns public.todos
language plpgsql security definer set search_path = ''
as $$
declare
  v_todo public.todos;
begin
  select * into v_todo from public.todos t where t.id = p_todo_id;
  if not found then
    raise exception 'not found' using errcode = 'P0002', hint = 'It does not exist or is not visible to you.';
  end if;
  perform private.tenant_authorize_v1(v_todo.tenant_id);
  select * into v_todo from public.todos t where t.id = p_todo_id for no key update;
  if v_todo.status in ('done', 'failed', 'cancelled') then
    raise exception 'The ToDo % is already %; there is nothing left to confirm.', v_todo.key, v_todo.status
      using errcode = '55000';
  end if;
  if not p_approved then
    perform private.todo_fail_terminal_v1(array[p_todo_id],
      array[format('The user declined %s.', v_todo.action)]);
  else
    update public.todos t
       set confirmed_at = coalesce(t.confirmed_at, now()),
           status = case when t.status = 'confirming' then 'ready' else t.status end,
           run_after = case when t.status = 'confirming' then greatest(t.run_after, now())
                            else t.run_after end,
           updated_at = now()
     where t.id = p_todo_id;
  end if;
  select * into v_todo from public.todos t where t.id = p_todo_id;
  return v_todo;
end;
$$;

create or replace function cpa.todo_note_v1(p_todo_id uuid, p_kind text, p_data jsonb)
returns bigint
language plpgsql security definer set search_path = ''
as $$
declare
  v_todo public.todos;
  v_id bigint;
begin
  select * into v_todo from public.todos t where t.id = p_todo_id;
  if not found then
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

-- grants ---------------------------------------------------------------------------------------
-- The moved functions keep their grants (execute for authenticated and service_role as before,
-- none for anon or public); restated here so this file alone shows who may call what.
revoke execute on all functions in schema cpa from public, anon;
grant execute on function
  cpa.job_create_v1(uuid, text, text, jsonb, text, integer, integer),
  cpa.todo_complete_v1(jsonb),
  cpa.todo_fail_v1(jsonb, double precision),
  cpa.todo_release_v1(jsonb, boolean, integer),
  cpa.todo_confirm_v1(uuid, boolean),
  cpa.job_cancel_v1(uuid),
  cpa.job_retry_v1(uuid),
  cpa.agent_upsert_v1(uuid, text, text, text[]),
  cpa.agent_claim_v1(uuid, text, text[], integer, double precision),
  cpa.todo_note_v1(uuid, text, jsonb),
  cpa.job_route_v1(uuid, text),
  cpa.rate_limit_hit_v1(uuid, integer, integer)
  to authenticated;
grant execute on all functions in schema cpa to service_role;
