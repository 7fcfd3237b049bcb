-- One lock order for every state change: job rows first, then ToDo rows (issue 15, review).
--
-- The deadlock. 20261126000500_operations wrote the order "ToDos, then jobs by id", and each
-- function kept it on its own; a transaction that called two of them did not. The dispatcher
-- commits the outcomes of many ToDos (of several jobs) in one transaction: todo_complete_v1
-- ends by locking its jobs' rows, and the todo_fail_v1 that follows in the same transaction
-- (a ToDo of one of those jobs failed for good) locks that job's unstarted ToDos in
-- todo_fail_terminal_v1: job, then ToDos. job_cancel_v1 locks the unstarted ToDos first and the
-- job row last: ToDos, then job. Each waited for the other and PostgreSQL aborted one with
-- 40P01: the API answered 503 to POST /v1/jobs/{id}/cancel. (job_attach_v1 in the same
-- transaction locks the job before the completion too.) Within todo_fail_terminal_v1, the
-- ToDos to fail were locked before the job's other ToDos by id, so a declined confirmation or
-- the desktop sweep's timeout could deadlock against a cancel holding a lower id.
-- tests/integration/test_lock_order.py drives those interleavings.
--
-- The order, from here on, in every function that changes jobs or ToDos:
--   1. the job rows, FOR NO KEY UPDATE, in ascending id, before any ToDo of them: a function
--      locks the jobs of the ToDos it is given (private.todo_jobs_lock_v1) or the job it is
--      given; a transaction that calls several functions (the dispatcher's report) locks all
--      its jobs first in one statement (cpa.job_lock_v1), so later re-locks are no-ops;
--   2. the ToDo rows, in ascending id (the caller's leased rows and the others in one pass
--      where one function locks both);
--   3. at commit, the events flush's advisory locks in ascending bucket order
--      (20261127110000_events_flush, 20261127120000_events_flush_bounded), unchanged: the
--      flush takes no row lock, so it stays last.
-- Holding a job row is what lets a transaction wait for a ToDo of that job, so two writers of
-- one job meet at the job row, before either holds a ToDo the other needs. The claims
-- (todo_claim, agent_claim, the sweep's notices) lock ready ToDos with SKIP LOCKED without
-- their job and take job rows only with SKIP LOCKED: they never wait while holding such a ToDo.
-- Lease expiry (in each claim) and the desktop sweep lock their jobs first, with SKIP LOCKED:
-- a job someone else holds is expired or swept on the next pass.
--
-- New versions: private.todo_fail_terminal_v2, private.todo_expire_v2, cpa.job_cancel_v2,
-- cpa.job_retry_v2, cpa.todo_complete_v2, cpa.todo_fail_v2, cpa.todo_release_v2,
-- cpa.todo_confirm_v2, cpa.desktop_sweep_v2, cpa.job_route_v2, cpa.todo_extend_v2, and
-- cpa.job_lock_v1 (the dispatcher's report locks its jobs first). The _v1 functions keep their
-- signatures and answers but now run the _v2 bodies: code of the previous deploy (and the _v1
-- functions that call them: agent_complete/fail/release_v1, todo_claim_v1/v2 through
-- todo_expire_v1, todo_reclaim_dead_v1) would otherwise take the old order beside the new one,
-- which deadlocks in its own way.

-- the jobs of some ToDos, locked (internal) ---------------------------------------------------
-- Locks the job rows of these ToDos in id order and returns their ids (sorted). An end user
-- locks only jobs of their own tenants (the ToDos of others are not theirs to report on).
-- A ToDo's job never changes, so reading it without a lock is safe.
create function private.todo_jobs_lock_v1(p_todo_ids uuid[])
returns uuid[]
language plpgsql security definer set search_path = ''
as $$
declare
  v_user boolean := private.caller_is_user_v1();
  v_jobs uuid[];
begin
  select array_agg(l.id order by l.id) into v_jobs
    from (
      select j.id from public.jobs j
       where j.id in (select t.job_id from public.todos t
                       where t.id = any(p_todo_ids)
                         and (not v_user or t.tenant_id in (select private.user_tenant_ids_v1())))
       order by j.id
         for no key update
    ) l;
  return coalesce(v_jobs, '{}');
end;
$$;
comment on function private.todo_jobs_lock_v1 is 'Lock the job rows of these ToDos (FOR NO KEY UPDATE, ascending id) and return their ids: step 1 of the lock order.';
revoke execute on function private.todo_jobs_lock_v1(uuid[]) from public, anon, authenticated, service_role;

-- the dispatcher's report: all its jobs first --------------------------------------------------
create function cpa.job_lock_v1(p_job_ids uuid[])
returns integer
language plpgsql security definer set search_path = ''
as $$
declare
  v_count integer;
begin
  select count(*)::integer into v_count
    from (select j.id from public.jobs j where j.id = any(p_job_ids)
           order by j.id for no key update) l;
  return v_count;
end;
$$;
comment on function cpa.job_lock_v1 is 'Lock these job rows (FOR NO KEY UPDATE, ascending id) for the rest of the transaction: a transaction that calls several operations takes its jobs first, in one order.';
revoke execute on function cpa.job_lock_v1(uuid[]) from public, anon, authenticated;
grant execute on function cpa.job_lock_v1(uuid[]) to service_role;

-- terminal failure (internal) ------------------------------------------------------------------
create function private.todo_fail_terminal_v2(p_ids uuid[], p_errors text[])
returns integer
language plpgsql security definer set search_path = ''
as $$
declare
  v_locked uuid[];
  v_jobs uuid[];
  v_count integer;
begin
  -- 1. the jobs; 2. the ToDos to fail and their jobs' unstarted ToDos, in one pass by id.
  select array_agg(x.id order by x.id) into v_locked
    from (
      select j.id from public.jobs j
       where j.id in (select t.job_id from public.todos t where t.id = any(p_ids))
       order by j.id
         for no key update
    ) x;
  if v_locked is null then
    return 0;
  end if;
  perform 1 from public.todos t
   where t.job_id = any(v_locked)
     and (t.id = any(p_ids) or t.status in ('waiting', 'confirming', 'ready'))
   order by t.id for no key update;

  with f as (
    select u.id, u.err from unnest(p_ids, p_errors) as u(id, err)
  ), upd as (
    update public.todos t
       set status = 'failed', error = f.err, finished_at = now(), updated_at = now(),
           lease_owner = null, lease_expires_at = null
      from f
     where t.id = f.id and t.status in ('waiting', 'confirming', 'ready', 'running')
    returning t.job_id
  )
  select array_agg(distinct upd.job_id), count(*) into v_jobs, v_count from upd;
  if v_count = 0 then
    return 0;
  end if;

  update public.todos t
     set status = 'cancelled', finished_at = now(), updated_at = now()
   where t.job_id = any(v_jobs) and t.status in ('waiting', 'confirming', 'ready');

  update public.jobs j
     set status = 'failed', completed_at = now(),
         error = (select format('ToDo %L failed: %s', t.key, t.error) from public.todos t
                   where t.job_id = j.id and t.status = 'failed' order by t.finished_at desc limit 1)
   where j.id = any(v_jobs) and j.status in ('pending', 'running');
  return v_count;
end;
$$;
comment on function private.todo_fail_terminal_v2 is 'Fail ToDos for good: their jobs fail and the jobs'' unstarted ToDos are cancelled. Locks the jobs first, then the ToDos by id.';
revoke execute on function private.todo_fail_terminal_v2(uuid[], text[]) from public, anon, authenticated, service_role;

create or replace function private.todo_fail_terminal_v1(p_ids uuid[], p_errors text[])
returns integer
language sql security definer set search_path = ''
as $$
  select private.todo_fail_terminal_v2(p_ids, p_errors)
$$;
revoke execute on function private.todo_fail_terminal_v1(uuid[], text[]) from public, anon, authenticated, service_role;

-- lease expiry (internal; every claim runs it first) -------------------------------------------
-- The jobs of the expired leases first, SKIP LOCKED (a claim never waits): the leases of a job
-- that someone holds now are expired by a later claim.
create function private.todo_expire_v2(p_limit integer default 100)
returns integer
language plpgsql security definer set search_path = ''
as $$
declare
  v_jobs uuid[];
  v_spent uuid[];
  v_count integer;
begin
  select array_agg(x.id order by x.id) into v_jobs
    from (
      select j.id from public.jobs j
       where j.id in (select t.job_id from public.todos t
                       where t.status = 'running' and t.lease_expires_at < now()
                       order by t.lease_expires_at limit p_limit)
       order by j.id
         for no key update skip locked
    ) x;
  if v_jobs is null then
    return 0;
  end if;
  with expired as (
    select t.id, t.attempts, t.max_attempts from public.todos t
     where t.status = 'running' and t.lease_expires_at < now() and t.job_id = any(v_jobs)
     order by t.lease_expires_at limit p_limit
     for update skip locked
  ), requeued as (
    update public.todos t
       set status = 'ready', lease_owner = null, lease_expires_at = null, run_after = now(),
           error = format('The lease expired during attempt %s.', t.attempts), updated_at = now()
      from expired e
     where t.id = e.id and e.attempts < e.max_attempts
    returning t.id
  )
  select (select count(*) from requeued)::integer,
         (select array_agg(e.id) from expired e where e.attempts >= e.max_attempts)
    into v_count, v_spent;
  if v_spent is not null then
    perform private.todo_fail_terminal_v2(
      v_spent,
      array(select 'The lease expired on the last of its attempts; the worker running it was lost.'
              from unnest(v_spent)));
  end if;
  return v_count + coalesce(array_length(v_spent, 1), 0);
end;
$$;
comment on function private.todo_expire_v2 is 'Requeue (or fail, on their last attempt) ToDos whose lease expired; locks their jobs first, skipping jobs held by others.';
revoke execute on function private.todo_expire_v2(integer) from public, anon, authenticated, service_role;

create or replace function private.todo_expire_v1(p_limit integer default 100)
returns integer
language sql security definer set search_path = ''
as $$
  select private.todo_expire_v2(p_limit)
$$;
revoke execute on function private.todo_expire_v1(integer) from public, anon, authenticated, service_role;

-- complete -------------------------------------------------------------------------------------
-- p_items: [{"id", "owner", "attempt"?, "result"}]
create function cpa.todo_complete_v2(p_items jsonb)
returns integer
language plpgsql security definer set search_path = ''
as $$
declare
  v_locked uuid[];
  v_done uuid[];
  v_jobs uuid[];
  v_user boolean := private.caller_is_user_v1();
begin
  v_locked := private.todo_jobs_lock_v1(
    array(select (i ->> 'id')::uuid from jsonb_array_elements(p_items) as i));
  perform 1 from public.todos t
   where t.id in (select (i ->> 'id')::uuid from jsonb_array_elements(p_items) as i)
     and t.job_id = any(v_locked) and t.status = 'running'
   order by t.id for no key update;
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
comment on function cpa.todo_complete_v2 is 'Complete leased ToDos in one transaction and release their dependents; a repeat or a stale lease changes nothing. Locks the jobs first, then the ToDos by id.';
revoke execute on function cpa.todo_complete_v2(jsonb) from public, anon;
grant execute on function cpa.todo_complete_v2(jsonb) to authenticated, service_role;

create or replace function cpa.todo_complete_v1(p_items jsonb)
returns integer
language sql security definer set search_path = ''
as $$
  select cpa.todo_complete_v2(p_items)
$$;
revoke execute on function cpa.todo_complete_v1(jsonb) from public, anon;
grant execute on function cpa.todo_complete_v1(jsonb) to authenticated, service_role;

-- fail -----------------------------------------------------------------------------------------
-- p_items: [{"id", "owner", "attempt"?, "error", "retryable"}]
create function cpa.todo_fail_v2(p_items jsonb, p_backoff_base double precision default 1.0)
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
    perform private.todo_fail_terminal_v2(v_terminal, v_final);
  end if;
  return v_retried + coalesce(array_length(v_terminal, 1), 0);
end;
$$;
comment on function cpa.todo_fail_v2 is 'Fail leased ToDos: retryable errors back off through run_after until max_attempts; otherwise the job fails and its unstarted ToDos are cancelled. Locks the jobs first, then the ToDos by id.';
revoke execute on function cpa.todo_fail_v2(jsonb, double precision) from public, anon;
grant execute on function cpa.todo_fail_v2(jsonb, double precision) to authenticated, service_role;

create or replace function cpa.todo_fail_v1(p_items jsonb, p_backoff_base double precision default 1.0)
returns integer
language sql security definer set search_path = ''
as $$
  select cpa.todo_fail_v2(p_items, p_backoff_base)
$$;
revoke execute on function cpa.todo_fail_v1(jsonb, double precision) from public, anon;
grant execute on function cpa.todo_fail_v1(jsonb, double precision) to authenticated, service_role;

-- release (refuse, shutdown) -------------------------------------------------------------------
create function cpa.todo_release_v2(
  p_items jsonb, p_refusal boolean default false, p_max_refusals integer default 3
) returns integer
language plpgsql security definer set search_path = ''
as $$
declare
  v_released integer;
  v_spent uuid[];
  v_user boolean := private.caller_is_user_v1();
begin
  perform private.todo_jobs_lock_v1(
    array(select (i ->> 'id')::uuid from jsonb_array_elements(p_items) as i));

  with items as (
    select (i ->> 'id')::uuid as id, i ->> 'owner' as owner from jsonb_array_elements(p_items) as i
  ), mine as materialized (
    select t.id, t.refusals from public.todos t join items on items.id = t.id
     where t.status = 'running'
       and t.lease_owner = items.owner
       and (not v_user or (items.owner like 'agent:%' and t.target = 'desktop'
                           and t.tenant_id in (select private.user_tenant_ids_v1())))
     order by t.id
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
    perform private.todo_fail_terminal_v2(
      v_spent,
      array(select format('Refused by %s agents; no agent will run it.', p_max_refusals)
              from unnest(v_spent)));
  end if;
  return v_released + coalesce(array_length(v_spent, 1), 0);
end;
$$;
comment on function cpa.todo_release_v2 is 'Give leases back (shutdown) or refuse them (counted; past p_max_refusals the ToDo fails). Locks the jobs first, then the ToDos by id.';
revoke execute on function cpa.todo_release_v2(jsonb, boolean, integer) from public, anon;
grant execute on function cpa.todo_release_v2(jsonb, boolean, integer) to authenticated, service_role;

create or replace function cpa.todo_release_v1(
  p_items jsonb, p_refusal boolean default false, p_max_refusals integer default 3
) returns integer
language sql security definer set search_path = ''
as $$
  select cpa.todo_release_v2(p_items, p_refusal, p_max_refusals)
$$;
revoke execute on function cpa.todo_release_v1(jsonb, boolean, integer) from public, anon;
grant execute on function cpa.todo_release_v1(jsonb, boolean, integer) to authenticated, service_role;

-- confirm: read without a lock, check the tenant, then the job, then the ToDo. -----------------
create function cpa.todo_confirm_v2(p_todo_id uuid, p_approved boolean default true)
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
  perform 1 from public.jobs j where j.id = v_todo.job_id for no key update;
  select * into v_todo from public.todos t where t.id = p_todo_id for no key update;
  if v_todo.status in ('done', 'failed', 'cancelled') then
    raise exception 'The ToDo % is already %; there is nothing left to confirm.', v_todo.key, v_todo.status
      using errcode = '55000';
  end if;
  if not p_approved then
    perform private.todo_fail_terminal_v2(array[p_todo_id],
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
comment on function cpa.todo_confirm_v2 is 'Approve (or decline: the ToDo fails) a ToDo that requires confirmation. Locks the job first, then the ToDo.';
revoke execute on function cpa.todo_confirm_v2(uuid, boolean) from public, anon;
grant execute on function cpa.todo_confirm_v2(uuid, boolean) to authenticated, service_role;

create or replace function cpa.todo_confirm_v1(p_todo_id uuid, p_approved boolean default true)
returns public.todos
language sql security definer set search_path = ''
as $$
  select * from cpa.todo_confirm_v2(p_todo_id, p_approved)
$$;
revoke execute on function cpa.todo_confirm_v1(uuid, boolean) from public, anon;
grant execute on function cpa.todo_confirm_v1(uuid, boolean) to authenticated, service_role;

-- cancel ---------------------------------------------------------------------------------------
-- The job row first (its status is read again under the lock), then its unstarted ToDos by id.
create function cpa.job_cancel_v2(p_job_id uuid)
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
  if v_job.status = 'cancelled' then
    return v_job;
  end if;
  if v_job.status in ('done', 'failed') then
    raise exception 'The job is already %; only pending or running jobs can be cancelled.', v_job.status
      using errcode = '55000';
  end if;
  -- Running ToDos finish (their results are kept); nothing new starts.
  perform 1 from public.todos t
   where t.job_id = p_job_id and t.status in ('waiting', 'confirming', 'ready')
   order by t.id for no key update;
  update public.todos t
     set status = 'cancelled', finished_at = now(), updated_at = now()
   where t.job_id = p_job_id and t.status in ('waiting', 'confirming', 'ready');
  update public.jobs j
     set status = 'cancelled', completed_at = now(), error = 'Cancelled on request.'
   where j.id = p_job_id
  returning * into v_job;
  return v_job;
end;
$$;
comment on function cpa.job_cancel_v2 is 'Cancel a pending or running job: running ToDos finish, nothing new starts. Locks the job first, then its ToDos by id.';
revoke execute on function cpa.job_cancel_v2(uuid) from public, anon;
grant execute on function cpa.job_cancel_v2(uuid) to authenticated, service_role;

create or replace function cpa.job_cancel_v1(p_job_id uuid)
returns public.jobs
language sql security definer set search_path = ''
as $$
  select * from cpa.job_cancel_v2(p_job_id)
$$;
revoke execute on function cpa.job_cancel_v1(uuid) from public, anon;
grant execute on function cpa.job_cancel_v1(uuid) to authenticated, service_role;

-- retry ----------------------------------------------------------------------------------------
create function cpa.job_retry_v2(p_job_id uuid)
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
         attempts = 0, refusals = 0, error = null, result = null, finished_at = null,
         run_after = now(), timer_until = null, updated_at = now()
    from (
      select c.id,
             (select count(*) from public.todo_edges e join public.todos p on p.id = e.depends_on_id
               where e.todo_id = c.id and p.status <> 'done')::integer as open
        from public.todos c
       where c.job_id = p_job_id and c.status in ('failed', 'cancelled')
    ) d
   where t.id = d.id;
  update public.jobs j
     set status = case when j.todos_done > 0 then 'running' else 'pending' end,
         error = null, completed_at = null, retry_count = j.retry_count + 1
   where j.id = p_job_id
  returning * into v_job;
  return v_job;
end;
$$;
comment on function cpa.job_retry_v2 is 'Retry a failed or cancelled job: its failed and cancelled ToDos start again. Locks the job first, then its ToDos by id.';
revoke execute on function cpa.job_retry_v2(uuid) from public, anon;
grant execute on function cpa.job_retry_v2(uuid) to authenticated, service_role;

create or replace function cpa.job_retry_v1(p_job_id uuid)
returns public.jobs
language sql security definer set search_path = ''
as $$
  select * from cpa.job_retry_v2(p_job_id)
$$;
revoke execute on function cpa.job_retry_v1(uuid) from public, anon;
grant execute on function cpa.job_retry_v1(uuid) to authenticated, service_role;

-- desktop sweep --------------------------------------------------------------------------------
-- desktop_sweep_v1's three steps, on the jobs it could lock first (SKIP LOCKED: the sweep runs
-- each dispatcher pass and never waits; a job someone holds is swept on the next pass).
create function cpa.desktop_sweep_v2(p_seen_seconds double precision default 120)
returns integer
language plpgsql security definer set search_path = ''
as $$
declare
  v_jobs uuid[];
  v_noticed integer;
  v_ids uuid[];
  v_errors text[];
  v_skipped integer := 0;
begin
  select array_agg(x.id order by x.id) into v_jobs
    from (
      select j.id from public.jobs j
       where j.id in (
         (select t.job_id from public.todos t
           where t.status = 'ready' and t.target = 'desktop' and t.agent_noticed_at is null
             and t.run_after <= now()
             and not exists (
               select 1 from public.agents a
                where a.tenant_id = t.tenant_id and t.action = any(a.actions)
                  and a.last_seen_at > now() - make_interval(secs => p_seen_seconds)
                  and (t.assigned_agent is null or a.agent_key = t.assigned_agent))
           order by t.id
           limit 500)
         union all
         select t.job_id from public.todos t
          where t.status = 'ready' and t.target = 'desktop' and t.agent_timeout_seconds is not null
            and t.run_after + make_interval(secs => t.agent_timeout_seconds) < now())
       order by j.id
         for no key update skip locked
    ) x;
  if v_jobs is null then
    return 0;
  end if;

  with waiting as (
    select t.id from public.todos t
     where t.status = 'ready' and t.target = 'desktop' and t.agent_noticed_at is null
       and t.run_after <= now() and t.job_id = any(v_jobs)
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
  -- leased to the sweep first so todo_complete_v2 accepts it.
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
  select coalesce(cpa.todo_complete_v2(jsonb_agg(jsonb_build_object(
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
comment on function cpa.desktop_sweep_v2 is 'Notice ready desktop ToDos that no online agent offers (an event per ToDo, once) and fail those whose agent timeout ran out. Locks the jobs first (skipping held ones), then the ToDos.';
revoke execute on function cpa.desktop_sweep_v2(double precision) from public, anon, authenticated;
grant execute on function cpa.desktop_sweep_v2(double precision) to service_role;

create or replace function cpa.desktop_sweep_v1(p_seen_seconds double precision default 120)
returns integer
language sql security definer set search_path = ''
as $$
  select cpa.desktop_sweep_v2(p_seen_seconds)
$$;
revoke execute on function cpa.desktop_sweep_v1(double precision) from public, anon, authenticated;
grant execute on function cpa.desktop_sweep_v1(double precision) to service_role;

-- route: pin a job's unstarted desktop ToDos to one agent; the job first, then them by id. ----
create function cpa.job_route_v2(p_job_id uuid, p_agent_key text)
returns integer
language plpgsql security definer set search_path = ''
as $$
declare
  v_count integer;
begin
  perform private.job_authorized_v1(p_job_id);
  perform 1 from public.jobs j where j.id = p_job_id for no key update;
  perform 1 from public.todos t
   where t.job_id = p_job_id and t.target = 'desktop'
     and t.status in ('waiting', 'confirming', 'ready')
   order by t.id for no key update;
  update public.todos t set assigned_agent = p_agent_key, updated_at = now()
   where t.job_id = p_job_id and t.target = 'desktop'
     and t.status in ('waiting', 'confirming', 'ready');
  get diagnostics v_count = row_count;
  return v_count;
end;
$$;
comment on function cpa.job_route_v2 is 'Route a job''s unstarted desktop ToDos to one agent of its tenant. Locks the job first, then the ToDos by id.';
revoke execute on function cpa.job_route_v2(uuid, text) from public, anon;
grant execute on function cpa.job_route_v2(uuid, text) to authenticated, service_role;

create or replace function cpa.job_route_v1(p_job_id uuid, p_agent_key text)
returns integer
language sql security definer set search_path = ''
as $$
  select cpa.job_route_v2(p_job_id, p_agent_key)
$$;
revoke execute on function cpa.job_route_v1(uuid, text) from public, anon;
grant execute on function cpa.job_route_v1(uuid, text) to authenticated, service_role;

-- extend leases: the jobs first, then the leased ToDos by id. ---------------------------------
-- (Snooze changes one leased ToDo in one statement and waits for nothing else: it stays v1.)
create function cpa.todo_extend_v2(p_ids uuid[], p_owner text, p_lease_seconds double precision)
returns integer
language plpgsql security definer set search_path = ''
as $$
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
comment on function cpa.todo_extend_v2 is 'Extend the leases of running ToDos held by p_owner. Locks the jobs first, then the ToDos by id.';
revoke execute on function cpa.todo_extend_v2(uuid[], text, double precision) from public, anon, authenticated;
grant execute on function cpa.todo_extend_v2(uuid[], text, double precision) to service_role;

create or replace function cpa.todo_extend_v1(p_ids uuid[], p_owner text, p_lease_seconds double precision)
returns integer
language sql security definer set search_path = ''
as $$
  select cpa.todo_extend_v2(p_ids, p_owner, p_lease_seconds)
$$;
revoke execute on function cpa.todo_extend_v1(uuid[], text, double precision) from public, anon, authenticated;
grant execute on function cpa.todo_extend_v1(uuid[], text, double precision) to service_role;
