-- Operations: every state change of jobs and ToDos is one of these SQL functions, called the
-- same way by the dispatcher, the API and Supabase RPC. Each runs in one transaction and is
-- idempotent under retry: completing, failing or releasing a ToDo matches its lease owner (and
-- attempt when given), so a late or repeated call changes nothing.
-- Functions are security definer with search_path = '': end users (role authenticated) are
-- checked against their memberships inside; the service role and the dispatcher's login role
-- act for any tenant. Versioned (_v1) so old and new code can run side by side in a deploy.
-- Row locks are FOR NO KEY UPDATE: inserting job_events takes FOR KEY SHARE on the job (its
-- foreign key), which FOR UPDATE would conflict with. Lock order everywhere: ToDos (the caller's own leased rows, then others by id), then jobs by
-- id. That keeps concurrent completers, failers and cancellers free of deadlocks.

-- insert a graph (internal) --------------------------------------------------------------------
-- ToDos and their edges for a job, positions after p_base; used by create and by attach.
create function private.todos_insert_v1(
  p_job_id uuid, p_tenant_id uuid, p_priority integer, p_base integer, p_todos jsonb
) returns integer
language plpgsql security definer set search_path = ''
as $$
declare
  v_edges integer;
  v_expected integer;
begin
  insert into public.todos (job_id, tenant_id, key, position, action, target, params, status,
                            priority, max_attempts, requires_confirmation, deps_remaining)
  select p_job_id, p_tenant_id, x.key, p_base + e.n::integer, x.action, coalesce(x.target, 'cloud'),
         coalesce(x.params, '{}'::jsonb),
         case when coalesce(jsonb_array_length(x.depends_on), 0) > 0 then 'waiting'
              when coalesce(x.requires_confirmation, false) then 'confirming'
              else 'ready' end,
         p_priority, coalesce(x.max_attempts, 3), coalesce(x.requires_confirmation, false),
         coalesce(jsonb_array_length(x.depends_on), 0)
  from jsonb_array_elements(p_todos) with ordinality as e(item, n)
  cross join lateral jsonb_to_record(e.item) as x(key text, action text, target text, params jsonb,
                                                 depends_on jsonb, max_attempts integer,
                                                 requires_confirmation boolean);

  insert into public.todo_edges (todo_id, depends_on_id, tenant_id)
  select c.id, p.id, p_tenant_id
  from jsonb_to_recordset(p_todos) as x(key text, depends_on jsonb)
  cross join lateral jsonb_array_elements_text(coalesce(x.depends_on, '[]'::jsonb)) as d(dep)
  join public.todos c on c.job_id = p_job_id and c.key = x.key
  join public.todos p on p.job_id = p_job_id and p.key = d.dep;
  get diagnostics v_edges = row_count;
  select coalesce(sum(jsonb_array_length(coalesce(x.depends_on, '[]'::jsonb))), 0)::integer
    into v_expected
  from jsonb_to_recordset(p_todos) as x(depends_on jsonb);
  if v_edges <> v_expected then
    raise exception 'A ToDo depends on a key that is not in the graph.' using errcode = '22023';
  end if;
  return jsonb_array_length(p_todos);
end;
$$;
revoke execute on function private.todos_insert_v1(uuid, uuid, integer, integer, jsonb) from public;

-- create ---------------------------------------------------------------------------------------
create function public.job_create_v1(
  p_tenant_id uuid,
  p_request text,
  p_intent text,
  p_todos jsonb,
  p_idempotency_key text default null,
  p_priority integer default 0,
  p_max_retries integer default 3
) returns public.jobs
language plpgsql security definer set search_path = ''
as $$
declare
  v_job public.jobs;
begin
  perform private.tenant_authorize_v1(p_tenant_id);
  if jsonb_typeof(p_todos) is distinct from 'array' or jsonb_array_length(p_todos) = 0 then
    raise exception 'A job needs a non-empty array of ToDos.' using errcode = '22023';
  end if;
  if p_idempotency_key is not null then
    select * into v_job from public.jobs j
    where j.tenant_id = p_tenant_id and j.idempotency_key = p_idempotency_key;
    if found then
      return v_job;
    end if;
  end if;

  insert into public.jobs (tenant_id, created_by, request, intent, priority, idempotency_key,
                           todo_count, max_retries)
  values (p_tenant_id, (select auth.uid()), p_request, p_intent, p_priority, p_idempotency_key,
          jsonb_array_length(p_todos), p_max_retries)
  on conflict (tenant_id, idempotency_key) where idempotency_key is not null do nothing
  returning * into v_job;
  if v_job.id is null then
    -- A concurrent request with the same key won the race: answer with its job.
    select * into v_job from public.jobs j
    where j.tenant_id = p_tenant_id and j.idempotency_key = p_idempotency_key;
    return v_job;
  end if;

  perform private.todos_insert_v1(v_job.id, p_tenant_id, p_priority, 0, p_todos);
  return v_job;
end;
$$;
comment on function public.job_create_v1 is 'Create a job with its whole ToDo graph in one transaction; a repeated idempotency key answers the existing job.';

-- terminal failure (internal) ------------------------------------------------------------------
create function private.todo_fail_terminal_v1(p_ids uuid[], p_errors text[])
returns integer
language plpgsql security definer set search_path = ''
as $$
declare
  v_jobs uuid[];
  v_count integer;
begin
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

  perform 1 from public.todos t
   where t.job_id = any(v_jobs) and t.status in ('waiting', 'confirming', 'ready')
   order by t.id for no key update;
  update public.todos t
     set status = 'cancelled', finished_at = now(), updated_at = now()
   where t.job_id = any(v_jobs) and t.status in ('waiting', 'confirming', 'ready');

  perform 1 from public.jobs j where j.id = any(v_jobs) order by j.id for no key update;
  update public.jobs j
     set status = 'failed', completed_at = now(),
         error = (select format('ToDo %L failed: %s', t.key, t.error) from public.todos t
                   where t.job_id = j.id and t.status = 'failed' order by t.finished_at desc limit 1)
   where j.id = any(v_jobs) and j.status in ('pending', 'running');
  return v_count;
end;
$$;

-- lease expiry (internal) ----------------------------------------------------------------------
create function private.todo_expire_v1(p_limit integer default 100)
returns integer
language plpgsql security definer set search_path = ''
as $$
declare
  v_spent uuid[];
  v_count integer;
begin
  with expired as (
    select t.id, t.attempts, t.max_attempts from public.todos t
     where t.status = 'running' and t.lease_expires_at < now()
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
    perform private.todo_fail_terminal_v1(
      v_spent,
      array(select 'The lease expired on the last of its attempts; the worker running it was lost.'
              from unnest(v_spent)));
  end if;
  return v_count + coalesce(array_length(v_spent, 1), 0);
end;
$$;

-- claim ----------------------------------------------------------------------------------------
create function public.todo_claim_v1(
  p_target text,
  p_owner text,
  p_limit integer,
  p_lease_seconds double precision default 60,
  p_tenant_id uuid default null,
  p_actions text[] default null
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
    -- Tenants with ready work: a loose index scan over todos_ready_idx, one probe per tenant.
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
  -- Fairness: each active tenant gets an equal share of the batch, so a tenant with 10,000
  -- ready ToDos cannot starve one with 5.
  v_share := greatest(1, ceil(p_limit::numeric / array_length(v_tenants, 1))::integer);

  return query
  with picked as materialized (
    select c.id
      from unnest(v_tenants) as a(tenant_id)
      cross join lateral (
        select t.id from public.todos t
         where t.status = 'ready' and t.target = p_target and t.tenant_id = a.tenant_id
           and t.run_after <= now()
           and (p_actions is null or t.action = any(p_actions))
           and (t.assigned_agent is null or 'agent:' || t.assigned_agent = p_owner)
         order by t.priority desc, t.run_after
         limit v_share
         for update skip locked
      ) c
     limit p_limit
  ), claimed as (
    update public.todos t
       set status = 'running', attempts = t.attempts + 1, lease_owner = p_owner,
           lease_expires_at = now() + make_interval(secs => p_lease_seconds),
           started_at = coalesce(t.started_at, now()), updated_at = now()
      from picked
     where t.id = picked.id
    returning t.*
  ), started as (
    -- Never wait on a job row: whoever holds it is starting or completing the job already.
    update public.jobs j
       set status = 'running', started_at = coalesce(j.started_at, now())
     where j.id in (select p.id from public.jobs p
                     where p.id in (select claimed.job_id from claimed) and p.status = 'pending'
                       for update skip locked)
  )
  select * from claimed;
end;
$$;
comment on function public.todo_claim_v1 is 'Claim up to p_limit ready ToDos of a target with FOR UPDATE SKIP LOCKED, fair across tenants, leased to p_owner; reclaims expired leases first.';

-- complete -------------------------------------------------------------------------------------
-- p_items: [{"id", "owner", "attempt"?, "result"}]
create function public.todo_complete_v1(p_items jsonb)
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
       and t.lease_owner is not distinct from coalesce(items.owner, t.lease_owner)
       and t.attempts = coalesce(items.attempt, t.attempts)
       and (not v_user or t.tenant_id in (select private.user_tenant_ids_v1()))
    returning t.id, t.job_id
  )
  select array_agg(upd.id), array_agg(distinct upd.job_id) into v_done, v_jobs from upd;
  if v_done is null then
    return 0;
  end if;

  -- Release dependents: lock them in id order, then decrement their open-dependency count.
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
         run_after = case when c.deps_remaining - rel.n > 0 then c.run_after else now() end,
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
comment on function public.todo_complete_v1 is 'Complete leased ToDos in one transaction and release their dependents; a repeat or a stale lease changes nothing.';

-- fail -----------------------------------------------------------------------------------------
-- p_items: [{"id", "owner", "attempt"?, "error", "retryable"}]
create function public.todo_fail_v1(p_items jsonb, p_backoff_base double precision default 1.0)
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
      select t.id, coalesce(i ->> 'error', 'unknown error') as error,
             coalesce((i ->> 'retryable')::boolean, false) and t.attempts < t.max_attempts as retry,
             case when coalesce((i ->> 'retryable')::boolean, false) then t.attempts end as attempts
        from jsonb_array_elements(p_items) as i
        join public.todos t on t.id = (i ->> 'id')::uuid
       where t.status = 'running'
         and t.lease_owner is not distinct from coalesce(i ->> 'owner', t.lease_owner)
         and t.attempts = coalesce((i ->> 'attempt')::integer, t.attempts)
         and (not v_user or t.tenant_id in (select private.user_tenant_ids_v1()))
       order by t.id
         for update of t
    ) s;
  if v_ids is null then
    return 0;
  end if;

  -- Exponential backoff: base * 2^(attempt-1) seconds, at most 10 minutes.
  update public.todos t
     set status = 'ready', error = u.error, lease_owner = null, lease_expires_at = null,
         run_after = now() + make_interval(secs => least(600, p_backoff_base * power(2, t.attempts - 1))),
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
comment on function public.todo_fail_v1 is 'Fail leased ToDos: retryable errors back off through run_after until max_attempts; otherwise the job fails and its unstarted ToDos are cancelled.';

-- release (refuse, shutdown) -------------------------------------------------------------------
-- p_items: [{"id", "owner"}]. A release gives the attempt back; a refusal also counts toward
-- p_max_refusals, after which the ToDo fails.
create function public.todo_release_v1(
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
       and t.lease_owner is not distinct from coalesce(items.owner, t.lease_owner)
       and (not v_user or t.tenant_id in (select private.user_tenant_ids_v1()))
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

-- snooze (timers) ------------------------------------------------------------------------------
create function public.todo_snooze_v1(p_id uuid, p_owner text, p_until timestamptz)
returns boolean
language plpgsql security definer set search_path = ''
as $$
begin
  update public.todos t
     set status = 'ready', timer_until = p_until, run_after = p_until,
         attempts = greatest(t.attempts - 1, 0), lease_owner = null, lease_expires_at = null,
         updated_at = now()
   where t.id = p_id and t.status = 'running' and t.lease_owner = p_owner;
  return found;
end;
$$;
comment on function public.todo_snooze_v1 is 'Park a leased timer ToDo until p_until without holding a worker or spending an attempt.';

-- extend lease ---------------------------------------------------------------------------------
create function public.todo_extend_v1(p_ids uuid[], p_owner text, p_lease_seconds double precision)
returns integer
language plpgsql security definer set search_path = ''
as $$
declare
  v_count integer;
begin
  update public.todos t
     set lease_expires_at = now() + make_interval(secs => p_lease_seconds)
   where t.id = any(p_ids) and t.status = 'running' and t.lease_owner = p_owner;
  get diagnostics v_count = row_count;
  return v_count;
end;
$$;

-- confirm --------------------------------------------------------------------------------------
create function public.todo_confirm_v1(p_todo_id uuid, p_approved boolean default true)
returns public.todos
language plpgsql security definer set search_path = ''
as $$
declare
  v_todo public.todos;
begin
  select * into v_todo from public.todos t where t.id = p_todo_id for update;
  if not found then
    raise exception 'not found' using errcode = 'P0002', hint = 'No such ToDo.';
  end if;
  perform private.tenant_authorize_v1(v_todo.tenant_id);
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
           run_after = case when t.status = 'confirming' then now() else t.run_after end,
           updated_at = now()
     where t.id = p_todo_id;
  end if;
  select * into v_todo from public.todos t where t.id = p_todo_id;
  return v_todo;
end;
$$;

-- a visible job (internal) ---------------------------------------------------------------------
create function private.job_authorized_v1(p_job_id uuid)
returns public.jobs
language plpgsql stable security definer set search_path = ''
as $$
declare
  v_job public.jobs;
begin
  select * into v_job from public.jobs j where j.id = p_job_id;
  if not found then
    raise exception 'not found' using errcode = 'P0002', hint = 'No such job.';
  end if;
  perform private.tenant_authorize_v1(v_job.tenant_id);
  return v_job;
end;
$$;
revoke execute on function private.job_authorized_v1(uuid) from public;

-- cancel ---------------------------------------------------------------------------------------
create function public.job_cancel_v1(p_job_id uuid)
returns public.jobs
language plpgsql security definer set search_path = ''
as $$
declare
  v_job public.jobs;
begin
  v_job := private.job_authorized_v1(p_job_id);
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
   where j.id = p_job_id and j.status in ('pending', 'running')
  returning * into v_job;
  if v_job.id is null then
    select * into v_job from public.jobs j where j.id = p_job_id;
  end if;
  return v_job;
end;
$$;

-- retry ----------------------------------------------------------------------------------------
create function public.job_retry_v1(p_job_id uuid)
returns public.jobs
language plpgsql security definer set search_path = ''
as $$
declare
  v_job public.jobs;
begin
  v_job := private.job_authorized_v1(p_job_id);
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

-- agents ---------------------------------------------------------------------------------------
create function public.agent_upsert_v1(
  p_tenant_id uuid, p_agent_key text, p_name text, p_actions text[]
) returns public.agents
language plpgsql security definer set search_path = ''
as $$
declare
  v_agent public.agents;
begin
  perform private.tenant_authorize_v1(p_tenant_id);
  insert into public.agents (tenant_id, agent_key, name, actions, created_by)
  values (p_tenant_id, p_agent_key, p_name, coalesce(p_actions, '{}'), (select auth.uid()))
  on conflict (tenant_id, agent_key) do update
     set name = coalesce(excluded.name, public.agents.name),
         actions = excluded.actions, last_seen_at = now()
  returning * into v_agent;
  return v_agent;
end;
$$;

-- A desktop agent claims ToDos of its tenant for the actions it offers.
create function public.agent_claim_v1(
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
  select * from public.todo_claim_v1('desktop', 'agent:' || p_agent_key, least(p_limit, 50),
                                     p_lease_seconds, p_tenant_id, p_actions);
end;
$$;

-- grants ---------------------------------------------------------------------------------------
revoke execute on function private.todo_fail_terminal_v1(uuid[], text[]) from public;
revoke execute on function private.todo_expire_v1(integer) from public;
revoke execute on function
  public.job_create_v1(uuid, text, text, jsonb, text, integer, integer),
  public.todo_claim_v1(text, text, integer, double precision, uuid, text[]),
  public.todo_complete_v1(jsonb),
  public.todo_fail_v1(jsonb, double precision),
  public.todo_release_v1(jsonb, boolean, integer),
  public.todo_snooze_v1(uuid, text, timestamptz),
  public.todo_extend_v1(uuid[], text, double precision),
  public.todo_confirm_v1(uuid, boolean),
  public.job_cancel_v1(uuid),
  public.job_retry_v1(uuid),
  public.agent_upsert_v1(uuid, text, text, text[]),
  public.agent_claim_v1(uuid, text, text[], integer, double precision)
  from public, anon;

-- End users: create, cancel, retry and confirm their jobs; act as their desktop agents.
grant execute on function
  public.job_create_v1(uuid, text, text, jsonb, text, integer, integer),
  public.todo_complete_v1(jsonb),
  public.todo_fail_v1(jsonb, double precision),
  public.todo_release_v1(jsonb, boolean, integer),
  public.todo_confirm_v1(uuid, boolean),
  public.job_cancel_v1(uuid),
  public.job_retry_v1(uuid),
  public.agent_upsert_v1(uuid, text, text, text[]),
  public.agent_claim_v1(uuid, text, text[], integer, double precision)
  to authenticated;

-- The dispatcher: everything.
grant execute on function
  public.job_create_v1(uuid, text, text, jsonb, text, integer, integer),
  public.todo_claim_v1(text, text, integer, double precision, uuid, text[]),
  public.todo_complete_v1(jsonb),
  public.todo_fail_v1(jsonb, double precision),
  public.todo_release_v1(jsonb, boolean, integer),
  public.todo_snooze_v1(uuid, text, timestamptz),
  public.todo_extend_v1(uuid[], text, double precision),
  public.todo_confirm_v1(uuid, boolean),
  public.job_cancel_v1(uuid),
  public.job_retry_v1(uuid),
  public.agent_upsert_v1(uuid, text, text, text[]),
  public.agent_claim_v1(uuid, text, text[], integer, double precision)
  to service_role;
