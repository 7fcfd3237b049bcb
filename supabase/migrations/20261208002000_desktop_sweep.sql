-- The desktop sweep, fixed in place (same signature and meaning; issue 21's loose ends).
--
-- 1. "No agent offers it" now means no agent that may claim it: since 20261207001000_user_privacy
--    a desktop ToDo goes only to its job owner's agents (a job nobody owns: agents the service
--    registered, or an owner's or admin's), as cpa.agent_claim_v2 picks them. Before, any agent
--    of the tenant counted, so a ToDo of a user whose desktop was off got no
--    todo.waiting_for_agent while a colleague's agent was online.
-- 2. A desktop ToDo that comes due later (run_at, a retry's backoff) changes no status when it
--    does, so nothing woke its owner's agents (private.agent_wake_v1 runs on becoming ready):
--    a long-polling claim found it only at its next poll. The sweep (each dispatcher pass, and
--    each second in long-running mode) now un-parks the due ones and wakes their owners.

create or replace function cpa.desktop_sweep_v3(p_seen_seconds double precision default 120)
returns integer
language plpgsql
security definer
set search_path = ''
as $$
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

revoke execute on function cpa.desktop_sweep_v3(double precision) from public, anon;
revoke execute on function cpa.desktop_sweep_v3(double precision) from authenticated;
grant execute on function cpa.desktop_sweep_v3(double precision) to service_role;
comment on function cpa.desktop_sweep_v3 is 'Wake the agents of desktop ToDos that came due; announce once (todo.waiting_for_agent) ready desktop ToDos that no agent allowed to claim them (the job owner''s) has offered in p_seen_seconds; skip optional and fail other ToDos past their agent_timeout_seconds. Takes the jobs'' gates exclusively without waiting (held jobs are swept on the next pass), then their rows, then the ToDos.';
