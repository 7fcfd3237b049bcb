-- A lost worker is not a failed attempt (issue 22, item 1).
--
-- Before. Every claim counts an attempt (todo_claim_pick_v1: attempts + 1), and an expired
-- lease requeued its ToDo with that attempt spent; on its last attempt the ToDo failed with "The
-- lease expired on the last of its attempts; the worker running it was lost" and the job
-- failed with it. Each kill -9 of a dispatcher therefore spent one attempt of every ToDo it
-- held: 12 kills of a worker during a 400-ToDo job failed it (315 ToDos cancelled).
--
-- Now. A lease that expires, or is reclaimed because its owner died (cpa.todo_reclaim_dead_v1
-- expires it now and runs the same expiry), adds one to the new todos.lost_leases instead of
-- spending an attempt: the retry budget of max_attempts is attempts - lost_leases, the
-- attempts the ToDo's executor really finished with a failure. attempts keeps counting every
-- claim, so the lease fence (complete and fail name the attempt they ran) still tells a stale
-- worker from the new one. A separate bound protects against a ToDo that kills every worker that
-- runs it: at private.lost_lease_limit_v1() lost leases (the transaction's setting
-- cpa.lost_lease_limit, which the API and the dispatchers set from CPA_LOST_LEASE_LIMIT;
-- 5 when unset) the ToDo fails with its own message and its job fails as on any terminal
-- failure. job_retry resets the count with the attempts.
--
-- Functions replaced in place (same names, signatures and lock order): private.todo_expire_v3
-- (run by every claim through todo_expire_v1/_v2), cpa.todo_fail_v2 (the budget),
-- private.job_retry_inner_v3 (the reset).

-- the count ------------------------------------------------------------------------------------
alter table public.todos
  add column lost_leases integer not null default 0 check (lost_leases >= 0);
comment on column public.todos.lost_leases is 'Leases of this ToDo that expired or were reclaimed from a dead worker; they do not count against max_attempts (the budget is attempts - lost_leases), and at private.lost_lease_limit_v1() the ToDo fails.';

-- the limit ------------------------------------------------------------------------------------
-- A transaction-local setting rather than a parameter: the expiry runs inside every claim
-- (the dispatcher's, the Lambda's, an agent's through the API), whose signatures stay; each
-- of those transactions sets it first (queries.sql: session_service_scope, session_user_scope).
create function private.lost_lease_limit_v1()
returns integer
language sql stable set search_path = ''
as $$
  select least(greatest(coalesce(
           case when current_setting('cpa.lost_lease_limit', true) ~ '^\s*[0-9]{1,4}\s*$'
                then current_setting('cpa.lost_lease_limit', true)::integer end,
           5), 1), 1000)
$$;
comment on function private.lost_lease_limit_v1 is 'How many lost leases a ToDo may have before it fails: the transaction''s cpa.lost_lease_limit (CPA_LOST_LEASE_LIMIT), 5 when unset, within 1..1000.';
revoke execute on function private.lost_lease_limit_v1() from public, anon, authenticated, service_role;

-- lease expiry ---------------------------------------------------------------------------------
-- Same gates, rows and order as before (exclusive gates without waiting, then the job rows
-- SKIP LOCKED, then the ToDos SKIP LOCKED); only what an expiry costs changes.
create or replace function private.todo_expire_v3(p_limit integer default 100)
returns integer
language plpgsql security definer set search_path = ''
as $$
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
comment on function private.todo_expire_v3 is 'Requeue ToDos whose lease expired (a lost worker: counted in lost_leases, not against max_attempts), fail those that reached the lost-lease limit, cancel those whose job has ended; takes their jobs'' gates and rows without waiting, leaving held jobs to a later pass.';
revoke execute on function private.todo_expire_v3(integer) from public, anon, authenticated, service_role;

-- fail: the retry budget leaves lost leases out --------------------------------------------------
-- p_items: [{"id", "owner", "attempt"?, "error", "retryable"}]
create or replace function cpa.todo_fail_v2(p_items jsonb, p_backoff_base double precision default 1.0)
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
  perform private.todo_jobs_lock_v1(
    array(select (i ->> 'id')::uuid from jsonb_array_elements(p_items) as i));

  select array_agg(s.id), array_agg(s.error), array_agg(s.retry), array_agg(s.attempts)
    into v_ids, v_errors, v_retry, v_attempts
    from (
      select t.id, left(coalesce(i ->> 'error', 'unknown error'), 4000) as error,
             coalesce((i ->> 'retryable')::boolean, false)
               and t.attempts - t.lost_leases < t.max_attempts as retry,
             case when coalesce((i ->> 'retryable')::boolean, false)
                  then t.attempts - t.lost_leases end as attempts
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

  -- Exponential backoff over the failed attempts: base * 2^(n-1) seconds, at most 10 minutes.
  update public.todos t
     set status = 'ready', error = u.error, lease_owner = null, lease_expires_at = null,
         run_after = now() + make_interval(secs => least(600, greatest(0, least(p_backoff_base, 60))
                                                             * power(2, greatest(t.attempts - t.lost_leases, 1) - 1))),
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
    perform private.todo_fail_terminal_v2(v_terminal, v_final);
  end if;
  return v_retried + coalesce(array_length(v_terminal, 1), 0);
end;
$$;
comment on function cpa.todo_fail_v2 is 'Fail leased ToDos: retryable errors back off through run_after until max_attempts failed attempts (lost leases do not count); otherwise the job fails and its unstarted ToDos are cancelled. Locks the jobs first, then the ToDos by id.';
revoke execute on function cpa.todo_fail_v2(jsonb, double precision) from public, anon;
grant execute on function cpa.todo_fail_v2(jsonb, double precision) to authenticated, service_role;

-- retry: a retried ToDo starts with no lost leases either ----------------------------------------
create or replace function private.job_retry_inner_v3(p_job_id uuid)
returns public.jobs
language plpgsql security definer set search_path = ''
as $$
declare
  v_job public.jobs;
begin
  perform private.job_authorized_v1(p_job_id);
  select * into v_job from public.jobs j where j.id = p_job_id for no key update;
  if not found then
    raise exception 'not found' using errcode = 'P0002', hint = 'It does not exist or is not visible to you.';
  end if;
  if v_job.status not in ('failed', 'cancelled') then
    raise exception 'The job is %; only failed or cancelled jobs can be retried.', v_job.status
      using errcode = '55000';
  end if;
  if v_job.retry_count >= v_job.max_retries then
    raise exception 'The job was already retried % times, the most allowed.', v_job.retry_count
      using errcode = '55000';
  end if;
  perform 1 from public.todos t
   where t.job_id = p_job_id and t.status in ('failed', 'cancelled')
   order by t.id for no key update;
  update public.todos t
     set deps_remaining = d.open,
         status = case when d.open > 0 then 'waiting'
                       when t.requires_confirmation and t.confirmed_at is null then 'confirming'
                       else 'ready' end,
         attempts = 0, lost_leases = 0, refusals = 0, error = null, result = null,
         finished_at = null, run_after = now(), timer_until = null, updated_at = now()
    from (
      select c.id,
             (select count(*) from public.todo_edges e join public.todos p on p.id = e.depends_on_id
               where e.todo_id = c.id and p.status <> 'done')::integer as open
        from public.todos c
       where c.job_id = p_job_id and c.status in ('failed', 'cancelled')
    ) d
   where t.id = d.id;
  -- Every ToDo already done: the job is done now.
  update public.jobs j
     set status = case when j.todos_done >= j.todo_count then 'done'
                       when j.todos_done > 0
                         or exists (select 1 from public.todos r
                                     where r.job_id = j.id and r.status = 'running')
                         then 'running'
                       else 'pending' end,
         error = null,
         completed_at = case when j.todos_done >= j.todo_count then now() end,
         retry_count = j.retry_count + 1
   where j.id = p_job_id
  returning * into v_job;
  return v_job;
end;
$$;
revoke execute on function private.job_retry_inner_v3(uuid) from public, anon, authenticated, service_role;
