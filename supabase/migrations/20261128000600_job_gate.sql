-- A per-job gate ahead of the row locks: the dispatcher's lanes of one job stop queueing on its
-- row (issue 15).
--
-- Why. 20261128000200_cancel_lock_order fixed the cancel deadlock with one order: a job's row
-- first, then its ToDos. A completion therefore held the job row from its first statement to
-- its commit, and two lanes draining one job ran one after the other: 544 ms of every
-- 10,000-ToDo drain waited in private.todo_jobs_lock_v1 (94 ms before), wide drains ran at x0.72.
--
-- The order from here on:
--   1. the job gates: a transaction-scoped advisory lock per job (private.job_gate_key_v1), taken
--      in ascending key order, shared or exclusive;
--   2. ToDo rows (in ascending id where a statement locks several);
--   3. job rows, in ascending id;
--   4. at commit, the events flush's advisory locks (class 7263200; claim fairness uses 7263100).
-- Reporters that only complete ToDos (todo_complete_v4, todo_complete_claim_v4, and through them
-- agent completions and the sweep's skips) take the gate SHARED: they wait for each other only
-- on rows (a dependent two of them release, the job row at the end), never in a cycle, because
-- they lock job rows last and a ToDo they complete is one they lease. Every other writer that
-- waits for a ToDo while it holds a job takes the gate EXCLUSIVE (cancel, retry, fail, release,
-- extend, confirm, route, attach, and private.todo_jobs_lock_v1 / cpa.job_lock_v1 for everything
-- built on them): it then meets no reporter of that job, so its old order (job row, then ToDos)
-- stays safe. The claims lock ready ToDos SKIP LOCKED and never wait; lease expiry and the desktop
-- sweep (which run inside claims) take exclusive gates with pg_try_advisory_xact_lock and leave
-- the jobs they cannot gate to a later pass.
-- A transaction that calls several of these must take all its gates first, exclusive where any
-- call needs it (cpa.job_gate_v1): asking for an exclusive gate while holding the shared one of
-- the same job waits for the other reporters, which may wait for the job row it holds. And it
-- must wait for no ToDo once a completion has locked its job rows (the dispatcher's report
-- fails and releases before it completes): complete-and-claim holds the ToDos it picked while
-- it waits for job rows.
--
-- Functions keep their names where only the gate is new: the old bodies move to private.*_inner
-- (ALTER FUNCTION keeps body, owner and settings) and the public name becomes "gate, then the
-- inner body", so the previous deploy's code takes the gate too.

-- the gate key -----------------------------------------------------------------------------------
-- The two-int4 advisory lock space, class 1785 (the flush uses 7263200, the claims' fairness
-- 7263100, the migration runner single bigint keys); the last 8 hex digits of the id are
-- random in UUID v4 and v7 alike. Two jobs that share a key share a gate: slower, never a
-- deadlock, since gates are taken in key order.
create function private.job_gate_key_v1(p_job_id uuid)
returns integer
language sql immutable parallel safe set search_path = ''
as $$
  select ('x' || right(p_job_id::text, 8))::bit(32)::integer
$$;
comment on function private.job_gate_key_v1 is 'The advisory lock key of a job''s gate (class 1785).';
revoke execute on function private.job_gate_key_v1(uuid) from public, anon, authenticated, service_role;

create function private.job_gate_v1(p_exclusive uuid[], p_shared uuid[] default '{}')
returns void
language plpgsql security definer set search_path = ''
as $$
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
end;
$$;
comment on function private.job_gate_v1 is 'Take the gates of these jobs for the transaction, in key order: exclusive for p_exclusive, shared for the others (step 1 of the lock order).';
revoke execute on function private.job_gate_v1(uuid[], uuid[]) from public, anon, authenticated, service_role;

-- Exclusive gates without waiting: the jobs whose gate this transaction holds now.
create function private.job_gate_try_v1(p_jobs uuid[])
returns uuid[]
language sql security definer set search_path = ''
as $$
  select coalesce(array_agg(j.id order by j.id), '{}')
    from (select distinct u.id from unnest(p_jobs) u(id) where u.id is not null) j
   where pg_try_advisory_xact_lock(1785, private.job_gate_key_v1(j.id))
$$;
comment on function private.job_gate_try_v1 is 'Take the exclusive gates of these jobs where no one holds them, without waiting; answers the jobs gated.';
revoke execute on function private.job_gate_try_v1(uuid[]) from public, anon, authenticated, service_role;

-- The gates of the jobs of some ToDos (an end user's: only ToDos of their tenants); their jobs.
create function private.todo_jobs_gate_v1(p_todo_ids uuid[], p_exclusive boolean)
returns uuid[]
language plpgsql security definer set search_path = ''
as $$
declare
  v_user boolean := private.caller_is_user_v1();
  v_jobs uuid[];
begin
  select coalesce(array_agg(distinct t.job_id), '{}') into v_jobs
    from public.todos t
   where t.id = any(p_todo_ids)
     and (not v_user or t.tenant_id in (select private.user_tenant_ids_v1()));
  if p_exclusive then
    perform private.job_gate_v1(v_jobs);
  else
    perform private.job_gate_v1('{}', v_jobs);
  end if;
  return v_jobs;
end;
$$;
comment on function private.todo_jobs_gate_v1 is 'Take the gates (exclusive or shared) of the jobs of these ToDos; answers those jobs.';
revoke execute on function private.todo_jobs_gate_v1(uuid[], boolean) from public, anon, authenticated, service_role;

-- the dispatcher's report: all its gates first ---------------------------------------------------
create function cpa.job_gate_v1(p_exclusive uuid[], p_shared uuid[] default '{}')
returns integer
language plpgsql security definer set search_path = ''
as $$
begin
  perform private.job_gate_v1(p_exclusive, p_shared);
  return (select count(distinct u.id)::integer
            from unnest(p_exclusive || p_shared) u(id) where u.id is not null);
end;
$$;
comment on function cpa.job_gate_v1 is 'Take these jobs'' gates for the rest of the transaction, in key order (exclusive wins where a job is in both lists): a transaction that calls several operations takes its gates first.';
revoke execute on function cpa.job_gate_v1(uuid[], uuid[]) from public, anon, authenticated;
grant execute on function cpa.job_gate_v1(uuid[], uuid[]) to service_role;

-- the job-first helpers now gate exclusively ----------------------------------------------------
-- Used by todo_fail_v2, todo_release_v2, todo_extend_v2 (and the _v1s that run them).
create or replace function private.todo_jobs_lock_v1(p_todo_ids uuid[])
returns uuid[]
language plpgsql security definer set search_path = ''
as $$
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
revoke execute on function private.todo_jobs_lock_v1(uuid[]) from public, anon, authenticated, service_role;

create or replace function cpa.job_lock_v1(p_job_ids uuid[])
returns integer
language plpgsql security definer set search_path = ''
as $$
declare
  v_count integer;
begin
  perform private.job_gate_v1(p_job_ids);
  select count(*)::integer into v_count
    from (select j.id from public.jobs j where j.id = any(p_job_ids)
           order by j.id for no key update) l;
  return v_count;
end;
$$;
revoke execute on function cpa.job_lock_v1(uuid[]) from public, anon, authenticated;
grant execute on function cpa.job_lock_v1(uuid[]) to service_role;

-- gate, then the old body: cancel, retry, route, confirm, attach ---------------------------------
alter function cpa.job_cancel_v2(uuid) rename to job_cancel_inner_v2;
alter function cpa.job_cancel_inner_v2(uuid) set schema private;
revoke execute on function private.job_cancel_inner_v2(uuid) from public, anon, authenticated, service_role;
create function cpa.job_cancel_v2(p_job_id uuid)
returns public.jobs
language plpgsql security definer set search_path = ''
as $$
begin
  perform private.job_authorized_v1(p_job_id);
  perform private.job_gate_v1(array[p_job_id]);
  return private.job_cancel_inner_v2(p_job_id);
end;
$$;
comment on function cpa.job_cancel_v2 is 'Cancel a job: its unstarted ToDos are cancelled. Takes the job''s gate exclusively, then its row, then its ToDos by id.';
revoke execute on function cpa.job_cancel_v2(uuid) from public, anon;
grant execute on function cpa.job_cancel_v2(uuid) to authenticated, service_role;

alter function cpa.job_retry_v3(uuid) rename to job_retry_inner_v3;
alter function cpa.job_retry_inner_v3(uuid) set schema private;
revoke execute on function private.job_retry_inner_v3(uuid) from public, anon, authenticated, service_role;
create function cpa.job_retry_v3(p_job_id uuid)
returns public.jobs
language plpgsql security definer set search_path = ''
as $$
begin
  perform private.job_authorized_v1(p_job_id);
  perform private.job_gate_v1(array[p_job_id]);
  return private.job_retry_inner_v3(p_job_id);
end;
$$;
comment on function cpa.job_retry_v3 is 'Retry a failed or cancelled job''s unfinished ToDos. Takes the job''s gate exclusively, then its row, then its ToDos by id.';
revoke execute on function cpa.job_retry_v3(uuid) from public, anon;
grant execute on function cpa.job_retry_v3(uuid) to authenticated, service_role;

alter function cpa.job_route_v2(uuid, text) rename to job_route_inner_v2;
alter function cpa.job_route_inner_v2(uuid, text) set schema private;
revoke execute on function private.job_route_inner_v2(uuid, text) from public, anon, authenticated, service_role;
create function cpa.job_route_v2(p_job_id uuid, p_agent_key text)
returns integer
language plpgsql security definer set search_path = ''
as $$
begin
  perform private.job_authorized_v1(p_job_id);
  perform private.job_gate_v1(array[p_job_id]);
  return private.job_route_inner_v2(p_job_id, p_agent_key);
end;
$$;
comment on function cpa.job_route_v2 is 'Route a job''s unfinished desktop ToDos to one agent. Takes the job''s gate exclusively, then its row, then its ToDos by id.';
revoke execute on function cpa.job_route_v2(uuid, text) from public, anon;
grant execute on function cpa.job_route_v2(uuid, text) to authenticated, service_role;

alter function cpa.todo_confirm_v2(uuid, boolean) rename to todo_confirm_inner_v2;
alter function cpa.todo_confirm_inner_v2(uuid, boolean) set schema private;
revoke execute on function private.todo_confirm_inner_v2(uuid, boolean) from public, anon, authenticated, service_role;
create function cpa.todo_confirm_v2(p_todo_id uuid, p_approved boolean default true)
returns public.todos
language plpgsql security definer set search_path = ''
as $$
begin
  -- Only a ToDo the caller may confirm gates its job; the inner body answers "not found" else.
  perform private.todo_jobs_gate_v1(array[p_todo_id], true);
  return private.todo_confirm_inner_v2(p_todo_id, p_approved);
end;
$$;
comment on function cpa.todo_confirm_v2 is 'Approve or decline a ToDo that waits for confirmation. Takes its job''s gate exclusively, then the job row, then the ToDo.';
revoke execute on function cpa.todo_confirm_v2(uuid, boolean) from public, anon;
grant execute on function cpa.todo_confirm_v2(uuid, boolean) to authenticated, service_role;

alter function cpa.job_attach_v1(uuid, jsonb) rename to job_attach_inner_v1;
alter function cpa.job_attach_inner_v1(uuid, jsonb) set schema private;
revoke execute on function private.job_attach_inner_v1(uuid, jsonb) from public, anon, authenticated, service_role;
create function cpa.job_attach_v1(p_job_id uuid, p_todos jsonb)
returns integer
language plpgsql security definer set search_path = ''
as $$
begin
  perform private.job_gate_v1(array[p_job_id]);
  return private.job_attach_inner_v1(p_job_id, p_todos);
end;
$$;
comment on function cpa.job_attach_v1 is 'Attach a planned sub-graph of ToDos to a pending or running job. Takes the job''s gate exclusively first.';
revoke execute on function cpa.job_attach_v1(uuid, jsonb) from public, anon, authenticated;
grant execute on function cpa.job_attach_v1(uuid, jsonb) to service_role;

-- lease expiry: exclusive gates, without waiting -------------------------------------------------
create function private.todo_expire_v3(p_limit integer default 100)
returns integer
language plpgsql security definer set search_path = ''
as $$
declare
  v_jobs uuid[];
  v_spent uuid[];
  v_count integer;
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
  -- cancelled. v2 requeued it and the next claim ran it.
  with expired as (
    select t.id, t.attempts, t.max_attempts, j.status in ('pending', 'running') as live
      from public.todos t join public.jobs j on j.id = t.job_id
     where t.status = 'running' and t.lease_expires_at < now() and t.job_id = any(v_jobs)
     order by t.lease_expires_at limit p_limit
     for update of t skip locked
  ), requeued as (
    update public.todos t
       set status = 'ready', lease_owner = null, lease_expires_at = null, run_after = now(),
           error = format('The lease expired during attempt %s.', t.attempts), updated_at = now()
      from expired e
     where t.id = e.id and e.live and e.attempts < e.max_attempts
    returning t.id
  ), ended as (
    update public.todos t
       set status = 'cancelled', lease_owner = null, lease_expires_at = null, finished_at = now(),
           error = format('The lease expired during attempt %s, after the job had ended.', t.attempts),
           updated_at = now()
      from expired e
     where t.id = e.id and not e.live
    returning t.id
  )
  select (select count(*) from requeued)::integer + (select count(*) from ended)::integer,
         (select array_agg(e.id) from expired e where e.live and e.attempts >= e.max_attempts)
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
comment on function private.todo_expire_v3 is 'Requeue (or fail, on their last attempt) ToDos whose lease expired, or cancel them when their job has ended; takes their jobs'' gates and rows without waiting, leaving held jobs to a later pass.';
revoke execute on function private.todo_expire_v3(integer) from public, anon, authenticated, service_role;

create or replace function private.todo_expire_v2(p_limit integer default 100)
returns integer
language sql security definer set search_path = ''
as $$
  select private.todo_expire_v3(p_limit)
$$;
revoke execute on function private.todo_expire_v2(integer) from public, anon, authenticated, service_role;

-- the desktop sweep: exclusive gates, without waiting --------------------------------------------
create function cpa.desktop_sweep_v3(p_seen_seconds double precision default 120)
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
  v_jobs := private.job_gate_try_v1(array(
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
comment on function cpa.desktop_sweep_v3 is 'As desktop_sweep_v2; takes the jobs'' gates exclusively without waiting (held jobs are swept on the next pass), then their rows, then the ToDos.';
revoke execute on function cpa.desktop_sweep_v3(double precision) from public, anon, authenticated;
grant execute on function cpa.desktop_sweep_v3(double precision) to service_role;

create or replace function cpa.desktop_sweep_v2(p_seen_seconds double precision default 120)
returns integer
language sql security definer set search_path = ''
as $$
  select cpa.desktop_sweep_v3(p_seen_seconds)
$$;
revoke execute on function cpa.desktop_sweep_v2(double precision) from public, anon, authenticated;
grant execute on function cpa.desktop_sweep_v2(double precision) to service_role;

-- the two halves every completion shares ---------------------------------------------------------
-- The dependents of completed ToDos, in id order: one fewer dependency each, ready (or
-- confirming) at none.
create function private.todo_dependents_release_v1(p_done uuid[])
returns void
language plpgsql security definer set search_path = ''
as $$
begin
  perform 1 from public.todos c
   where c.id in (select e.todo_id from public.todo_edges e where e.depends_on_id = any(p_done))
     and c.status = 'waiting'
   order by c.id for no key update;
  with rel as (
    select e.todo_id, count(*)::integer as n
      from public.todo_edges e where e.depends_on_id = any(p_done)
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
end;
$$;
comment on function private.todo_dependents_release_v1 is 'Count the completion of these ToDos in their waiting dependents (locked in id order); those with none left become ready or confirming.';
revoke execute on function private.todo_dependents_release_v1(uuid[]) from public, anon, authenticated, service_role;

-- The job rows last, in id order: one completion per element of p_jobs (an id once per ToDo).
create function private.job_counts_add_v1(p_jobs uuid[])
returns void
language plpgsql security definer set search_path = ''
as $$
begin
  perform 1 from public.jobs j where j.id = any(p_jobs) order by j.id for no key update;
  with n as (
    select u.job_id, count(*)::integer as k from unnest(p_jobs) u(job_id) group by u.job_id
  )
  update public.jobs j
     set todos_done = j.todos_done + n.k,
         status = case when j.status in ('pending', 'running') and j.todos_done + n.k >= j.todo_count
                         then 'done'
                       when j.status = 'pending' then 'running'
                       else j.status end,
         started_at = case when j.status = 'pending' then coalesce(j.started_at, now())
                           else j.started_at end,
         completed_at = case when j.status in ('pending', 'running') and j.todos_done + n.k >= j.todo_count
                             then now() else j.completed_at end
    from n
   where j.id = n.job_id;
end;
$$;
comment on function private.job_counts_add_v1 is 'Add completed ToDos to their jobs'' counts (rows locked in id order): a pending job starts, a job with all its ToDos done is done.';
revoke execute on function private.job_counts_add_v1(uuid[]) from public, anon, authenticated, service_role;

-- complete: shared gates, ToDos, then the job rows ------------------------------------------------
-- p_items: [{"id", "owner", "attempt"?, "result"}]
create function cpa.todo_complete_v4(p_items jsonb)
returns integer
language plpgsql security definer set search_path = ''
as $$
declare
  v_done uuid[];
  v_jobs uuid[];
  v_user boolean := private.caller_is_user_v1();
begin
  perform private.todo_jobs_gate_v1(
    array(select (i ->> 'id')::uuid from jsonb_array_elements(p_items) as i), false);
  -- Leased ToDos: no other reporter completes them, and no exclusive writer of their job runs.
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
  select array_agg(upd.id), array_agg(upd.job_id) into v_done, v_jobs from upd;
  if v_done is null then
    return 0;
  end if;

  perform private.todo_dependents_release_v1(v_done);
  perform private.job_counts_add_v1(v_jobs);
  return cardinality(v_done);
end;
$$;
comment on function cpa.todo_complete_v4 is 'Complete leased ToDos in one transaction and release their dependents; a repeat or a stale lease changes nothing; a pending job starts or finishes with them. Takes the jobs'' gates shared, then the ToDos, then the job rows.';
revoke execute on function cpa.todo_complete_v4(jsonb) from public, anon;
grant execute on function cpa.todo_complete_v4(jsonb) to authenticated, service_role;

create or replace function cpa.todo_complete_v3(p_items jsonb)
returns integer
language sql security definer set search_path = ''
as $$
  select cpa.todo_complete_v4(p_items)
$$;
revoke execute on function cpa.todo_complete_v3(jsonb) from public, anon;
grant execute on function cpa.todo_complete_v3(jsonb) to authenticated, service_role;

-- complete and claim: shared gates of the completed ToDos' jobs -----------------------------------
create function cpa.todo_complete_claim_v4(
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
  if jsonb_array_length(coalesce(p_items, '[]'::jsonb)) > 0 then
    perform private.todo_jobs_gate_v1(
      array(select (i ->> 'id')::uuid from jsonb_array_elements(p_items) as i), false);
  end if;

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
    perform private.todo_dependents_release_v1(v_done);
  end if;

  -- The claim waits for nothing (SKIP LOCKED), but the ToDos it picks stay held while the
  -- counts below wait for job rows. That is safe only because no transaction that holds a job
  -- row waits for a ToDo of another job: an exclusive writer waits only for ToDos of its own
  -- gated job (no completion of which runs beside it), and a transaction waits for no ToDo
  -- after its completions' counts (the dispatcher's report runs its exclusive operations
  -- first). Picking before the counts keeps the pick out of the time the job row is held.
  if p_limit > 0 then
    select array_agg(c) into v_rows
      from private.todo_claim_pick_v1(p_target, p_owner, p_limit, p_lease_seconds, p_tenant_id,
                                      p_actions, p_tenant_cap) c;
    v_start := array(select distinct r.job_id from unnest(v_rows) r);
  end if;
  if v_done is not null then
    perform private.job_counts_add_v1(v_jobs);
  end if;
  -- After the counts: a started job's row, held while the counts waited for another job's,
  -- would close a cycle with a completion that counts both in id order.
  if cardinality(v_start) > 0 then
    update public.jobs j
       set status = 'running', started_at = coalesce(j.started_at, now())
     where j.id in (select p.id from public.jobs p
                     where p.id = any(v_start) and p.status = 'pending'
                       for update skip locked);
  end if;

  if v_rows is null then
    return query select v_n, null::public.todos;
  else
    return query select v_n, r from unnest(v_rows) r;
  end if;
end;
$$;
comment on function cpa.todo_complete_claim_v4 is 'As todo_complete_claim_v3, in the gate order: the completed ToDos'' jobs'' gates shared, the ToDos, the claim (SKIP LOCKED), the job rows, then the claimed pending jobs'' start (SKIP LOCKED). Rows: (done, claimed ToDo or null).';
revoke execute on function
  cpa.todo_complete_claim_v4(jsonb, text, text, integer, double precision, uuid, text[], integer)
  from public, anon, authenticated;
grant execute on function
  cpa.todo_complete_claim_v4(jsonb, text, text, integer, double precision, uuid, text[], integer)
  to service_role;

create or replace function cpa.todo_complete_claim_v3(
  p_items jsonb,
  p_target text,
  p_owner text,
  p_limit integer,
  p_lease_seconds double precision default 60,
  p_tenant_id uuid default null,
  p_actions text[] default null,
  p_tenant_cap integer default null
) returns table (done integer, todo public.todos)
language sql security definer set search_path = ''
as $$
  select * from cpa.todo_complete_claim_v4(p_items, p_target, p_owner, p_limit, p_lease_seconds,
                                           p_tenant_id, p_actions, p_tenant_cap)
$$;
revoke execute on function
  cpa.todo_complete_claim_v3(jsonb, text, text, integer, double precision, uuid, text[], integer)
  from public, anon, authenticated;
grant execute on function
  cpa.todo_complete_claim_v3(jsonb, text, text, integer, double precision, uuid, text[], integer)
  to service_role;
