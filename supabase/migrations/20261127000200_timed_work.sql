-- Timed work: an earliest start for jobs and ToDos (run_at), the time zone a request was read
-- in, and desktop ToDos that wait for an agent (a notice, and an optional agent timeout).
-- New operations live in schema `cpa`, which the Data API does not expose.

create schema if not exists cpa;
comment on schema cpa is 'Operations (SQL functions) of CPA Scheduler; not exposed through the Data API.';
revoke all on schema cpa from public;
grant usage on schema cpa to authenticated, service_role;

-- columns --------------------------------------------------------------------------------------
alter table public.jobs
  add column run_at timestamptz,
  add column time_zone text not null default 'UTC' check (length(time_zone) between 1 and 64);
comment on column public.jobs.run_at is 'Earliest start of every ToDo of the job (null: immediate).';
comment on column public.jobs.time_zone is 'The IANA zone times in the request were read in.';

alter table public.todos
  add column run_at timestamptz,
  add column agent_timeout_seconds integer check (agent_timeout_seconds between 1 and 2592000),
  add column agent_noticed_at timestamptz,
  add column optional boolean not null default false;
comment on column public.todos.run_at is 'Earliest start (null: immediate). run_after never drops below it, so nothing claims the ToDo earlier.';
comment on column public.todos.agent_timeout_seconds is 'A desktop ToDo fails when no agent has taken it this long after it became ready.';
comment on column public.todos.agent_noticed_at is 'When the job was told that this desktop ToDo waits for an agent.';
comment on column public.todos.optional is 'Best effort: at its agent timeout the ToDo is skipped (done, result {"skipped": true}) instead of failing the job.';

-- The next-due lookup of the long-running dispatcher's alarm.
create index todos_ready_run_after_idx on public.todos (target, run_after) where status = 'ready';

-- run_at holds run_after -----------------------------------------------------------------------
-- Every path that sets run_after (release of dependents, retry, refusal, backoff) goes through
-- this trigger, so no operation has to know about run_at.
create function private.todos_hold_until_run_at_v1()
returns trigger
language plpgsql set search_path = ''
as $$
begin
  if new.run_after < new.run_at then
    new.run_after := new.run_at;
  end if;
  return new;
end;
$$;
revoke execute on function private.todos_hold_until_run_at_v1() from public;

create trigger todos_hold_until_run_at
  before insert or update of run_after, run_at on public.todos
  for each row when (new.run_at is not null)
  execute function private.todos_hold_until_run_at_v1();

-- A ToDo that starts over (job retry) may be announced again when it waits for an agent.
create function private.todos_reset_agent_notice_v1()
returns trigger
language plpgsql set search_path = ''
as $$
begin
  new.agent_noticed_at := null;
  return new;
end;
$$;
revoke execute on function private.todos_reset_agent_notice_v1() from public;

create trigger todos_reset_agent_notice
  before update of status on public.todos
  for each row
  when (old.status in ('failed', 'cancelled') and new.status in ('waiting', 'confirming', 'ready')
        and old.agent_noticed_at is not null)
  execute function private.todos_reset_agent_notice_v1();

-- create, with times ---------------------------------------------------------------------------
-- As job_create_v1, plus the job's run_at and zone, each ToDo's run_at ("run_at" in an item;
-- the later of the two wins), agent timeout ("agent_timeout" seconds) and whether it is
-- best effort ("optional": skipped instead of failed at its agent timeout).
create function cpa.job_create_v2(
  p_tenant_id uuid,
  p_request text,
  p_intent text,
  p_todos jsonb,
  p_idempotency_key text default null,
  p_priority integer default 0,
  p_max_retries integer default 3,
  p_run_at timestamptz default null,
  p_time_zone text default 'UTC'
) returns public.jobs
language plpgsql security definer set search_path = ''
as $$
declare
  v_job public.jobs;
begin
  v_job := public.job_create_v1(p_tenant_id, p_request, p_intent, p_todos, p_idempotency_key,
                                p_priority, p_max_retries);
  -- A repeated idempotency key answers the job an earlier transaction made: leave it alone.
  if v_job.created_at <> now() then
    return v_job;
  end if;
  update public.jobs j set run_at = p_run_at, time_zone = coalesce(p_time_zone, 'UTC')
   where j.id = v_job.id
  returning * into v_job;
  update public.todos t
     set run_at = greatest(p_run_at, (x.item ->> 'run_at')::timestamptz),
         agent_timeout_seconds = (x.item ->> 'agent_timeout')::integer,
         optional = coalesce((x.item ->> 'optional')::boolean, false)
    from jsonb_array_elements(p_todos) as x(item)
   where t.job_id = v_job.id and t.key = x.item ->> 'key'
     and (p_run_at is not null or x.item ? 'run_at' or x.item ? 'agent_timeout'
          or x.item ? 'optional');
  return v_job;
end;
$$;
comment on function cpa.job_create_v2 is 'Create a job with its ToDo graph, an optional earliest start (job-wide and per ToDo) and per-ToDo agent timeouts; a repeated idempotency key answers the existing job.';
revoke execute on function cpa.job_create_v2(uuid, text, text, jsonb, text, integer, integer, timestamptz, text) from public, anon;
grant execute on function cpa.job_create_v2(uuid, text, text, jsonb, text, integer, integer, timestamptz, text) to authenticated, service_role;

-- desktop ToDos waiting for an agent -----------------------------------------------------------
-- Called by the dispatcher each pass. Tells the job once when a ready desktop ToDo has no agent
-- of its tenant offering the action (none seen within p_seen_seconds), and fails ToDos whose
-- agent timeout ran out (optional ones are skipped: completed with {"skipped": true}).
-- Returns the number of ToDos noticed, failed or skipped.
create function cpa.desktop_sweep_v1(p_seen_seconds double precision default 120)
returns integer
language plpgsql security definer set search_path = ''
as $$
declare
  v_noticed integer;
  v_ids uuid[];
  v_errors text[];
  v_skipped integer := 0;
begin
  with waiting as (
    select t.id from public.todos t
     where t.status = 'ready' and t.target = 'desktop' and t.agent_noticed_at is null
       and t.run_after <= now()
       and not exists (
         select 1 from public.agents a
          where a.tenant_id = t.tenant_id and t.action = any(a.actions)
            and a.last_seen_at > now() - make_interval(secs => p_seen_seconds)
            and (t.assigned_agent is null or a.agent_key = t.assigned_agent))
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
  -- leased to the sweep first so todo_complete_v1 accepts it.
  with expired as (
    select t.id from public.todos t
     where t.status = 'ready' and t.target = 'desktop' and t.optional
       and t.agent_timeout_seconds is not null
       and t.run_after + make_interval(secs => t.agent_timeout_seconds) < now()
     order by t.id
     for no key update skip locked
  ), leased as (
    update public.todos t set status = 'running', lease_owner = 'sweep',
           lease_expires_at = now() + interval '1 minute', started_at = now()
      from expired e where t.id = e.id
    returning t.id, t.action, t.agent_timeout_seconds
  )
  select coalesce(public.todo_complete_v1(jsonb_agg(jsonb_build_object(
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
     and not t.optional
     and t.run_after + make_interval(secs => t.agent_timeout_seconds) < now();
  if v_ids is not null then
    perform private.todo_fail_terminal_v1(v_ids, v_errors);
  end if;
  return v_noticed + v_skipped + coalesce(array_length(v_ids, 1), 0);
end;
$$;
comment on function cpa.desktop_sweep_v1 is 'Notice ready desktop ToDos that no online agent offers (an event per ToDo, once) and fail those whose agent timeout ran out.';
revoke execute on function cpa.desktop_sweep_v1(double precision) from public, anon, authenticated;
grant execute on function cpa.desktop_sweep_v1(double precision) to service_role;
