-- Fold single-caller helpers into their callers, and drop what that leaves without a caller.
--
-- Issue 23: a reader following an operation today goes from the cpa function into a private
-- "_inner" body, a chain of wrappers (todo_expire_v1 -> _v2 -> _v3) or an older version the newer
-- one calls (job_create_v2 -> job_create_v1). Each function below is replaced in place with the
-- same signature and meaning (the rule in supabase/README.md, "Versions and deploys"), now
-- holding the body it used to call; the helpers left without a caller are dropped. None of the
-- dropped functions is called by this release's code or by the previous release's (e2715a4;
-- tests/fixtures/calls_e2715a4.txt). Lock order and answers are unchanged: each operation still
-- authorizes, takes its job's gate, then locks the job row, then its ToDos by id, statement by
-- statement (a plpgsql statement reads with a new snapshot, as the called body's did).
--
-- Live functions in cpa, private and public: 96 before, 80 after.

-- The job gate: one function. cpa.job_gate_v1 (the dispatcher's report) ran private.job_gate_v1;
-- it now takes the locks itself and the internal callers call it.
create or replace function cpa.job_gate_v1(p_exclusive uuid[], p_shared uuid[] default '{}')
returns integer
language plpgsql
security definer
set search_path = ''
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
  return (select count(distinct u.id)::integer
            from unnest(p_exclusive || p_shared) u(id) where u.id is not null);
end;
$$;
revoke execute on function cpa.job_gate_v1(uuid[], uuid[]) from public, anon;
revoke execute on function cpa.job_gate_v1(uuid[], uuid[]) from authenticated;
grant execute on function cpa.job_gate_v1(uuid[], uuid[]) to service_role;

-- Job operations: the "_inner" bodies move into the operations that gate them --------------------

create or replace function cpa.job_attach_v1(p_job_id uuid, p_todos jsonb)
returns integer
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_job public.jobs;
  v_count integer := jsonb_array_length(p_todos);
  v_base integer;
begin
  perform cpa.job_gate_v1(array[p_job_id]);
  select * into v_job from public.jobs j where j.id = p_job_id for no key update;
  if not found then
    raise exception 'not found' using errcode = 'P0002', hint = 'No such job.';
  end if;
  if v_job.status not in ('pending', 'running') then
    raise exception 'The job is %; a plan can only be attached to a pending or running job.', v_job.status
      using errcode = '55000';
  end if;
  if exists (select 1 from public.todos t
              where t.job_id = p_job_id
                and t.key in (select x ->> 'key' from jsonb_array_elements(p_todos) x)) then
    raise exception 'A planned ToDo key is already used in this job.' using errcode = '22023';
  end if;
  select coalesce(max(t.position), 0) into v_base from public.todos t where t.job_id = p_job_id;

  perform private.todos_insert_v1(p_job_id, v_job.tenant_id, v_job.priority, v_base, p_todos);

  update public.jobs j set todo_count = j.todo_count + v_count where j.id = p_job_id;
  return v_count;
end;
$$;
revoke execute on function cpa.job_attach_v1(uuid, jsonb) from public, anon;
revoke execute on function cpa.job_attach_v1(uuid, jsonb) from authenticated;
grant execute on function cpa.job_attach_v1(uuid, jsonb) to service_role;

create or replace function cpa.job_cancel_v2(p_job_id uuid)
returns public.jobs
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_job public.jobs;
begin
  perform private.job_authorized_v1(p_job_id);
  perform cpa.job_gate_v1(array[p_job_id]);
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
  -- Running ToDos end too, in the statement before the job's: the job's event is its last.
  perform 1 from public.todos t
   where t.job_id = p_job_id and t.status in ('waiting', 'confirming', 'ready', 'running')
   order by t.id for no key update;
  update public.todos t
     set status = 'cancelled', finished_at = now(), updated_at = now(),
         lease_owner = null, lease_expires_at = null,
         error = case when t.status = 'running'
                      then 'Cancelled while it ran: the job was cancelled. A result its worker reports later is dropped.'
                      else t.error end
   where t.job_id = p_job_id and t.status in ('waiting', 'confirming', 'ready', 'running');
  update public.jobs j
     set status = 'cancelled', completed_at = now(), error = 'Cancelled on request.'
   where j.id = p_job_id
  returning * into v_job;
  return v_job;
end;
$$;
revoke execute on function cpa.job_cancel_v2(uuid) from public, anon;
grant execute on function cpa.job_cancel_v2(uuid) to authenticated, service_role;

create or replace function cpa.job_retry_v3(p_job_id uuid)
returns public.jobs
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_job public.jobs;
begin
  perform private.job_authorized_v1(p_job_id);
  perform cpa.job_gate_v1(array[p_job_id]);
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
revoke execute on function cpa.job_retry_v3(uuid) from public, anon;
grant execute on function cpa.job_retry_v3(uuid) to authenticated, service_role;

create or replace function cpa.job_route_v2(p_job_id uuid, p_agent_key text)
returns integer
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_count integer;
begin
  perform private.job_authorized_v1(p_job_id);
  perform cpa.job_gate_v1(array[p_job_id]);
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
revoke execute on function cpa.job_route_v2(uuid, text) from public, anon;
grant execute on function cpa.job_route_v2(uuid, text) to authenticated, service_role;

create or replace function cpa.todo_confirm_v2(p_todo_id uuid, p_approved boolean default true)
returns public.todos
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_todo public.todos;
begin
  -- Only a ToDo the caller may confirm gates its job; the next statement answers "not found" else.
  perform private.todo_jobs_gate_v1(array[p_todo_id], true);
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
revoke execute on function cpa.todo_confirm_v2(uuid, boolean) from public, anon;
grant execute on function cpa.todo_confirm_v2(uuid, boolean) to authenticated, service_role;

-- Agent reports: the newest report functions directly; the agent check with the items --------

create or replace function private.agent_items_v1(p_agent_key text, p_items jsonb)
returns jsonb
language plpgsql
stable
security definer
set search_path = ''
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
  return (select coalesce(jsonb_agg(i.item || jsonb_build_object('owner', private.agent_owner_v1(p_agent_key))
                                    order by i.n), '[]'::jsonb)
            from jsonb_array_elements(p_items) with ordinality as i(item, n));
end;
$$;
revoke execute on function private.agent_items_v1(text, jsonb) from public, anon;
comment on function private.agent_items_v1 is 'Report items with the agent''s lease owner (private.agent_owner_v1) as each item''s owner; CP403 when a user reports under another user''s agent id.';

create or replace function cpa.agent_complete_v1(p_agent_key text, p_items jsonb)
returns integer
language plpgsql
security definer
set search_path = ''
as $$
begin
  return cpa.todo_complete_v4(private.agent_items_v1(p_agent_key, p_items));
end;
$$;
revoke execute on function cpa.agent_complete_v1(text, jsonb) from public, anon;
grant execute on function cpa.agent_complete_v1(text, jsonb) to authenticated, service_role;

create or replace function cpa.agent_fail_v1(p_agent_key text, p_items jsonb,
                                             p_backoff_base double precision default 1.0)
returns integer
language plpgsql
security definer
set search_path = ''
as $$
begin
  return cpa.todo_fail_v2(private.agent_items_v1(p_agent_key, p_items), p_backoff_base);
end;
$$;
revoke execute on function cpa.agent_fail_v1(text, jsonb, double precision) from public, anon;
grant execute on function cpa.agent_fail_v1(text, jsonb, double precision) to authenticated, service_role;

create or replace function cpa.agent_release_v1(p_agent_key text, p_items jsonb,
                                                p_refusal boolean default false,
                                                p_max_refusals integer default 3)
returns integer
language plpgsql
security definer
set search_path = ''
as $$
begin
  return cpa.todo_release_v2(private.agent_items_v1(p_agent_key, p_items), p_refusal,
                             p_max_refusals);
end;
$$;
revoke execute on function cpa.agent_release_v1(text, jsonb, boolean, integer) from public, anon;
grant execute on function cpa.agent_release_v1(text, jsonb, boolean, integer) to authenticated, service_role;

comment on function cpa.agent_complete_v1 is 'cpa.todo_complete_v4 for the ToDos the agent holds (owner private.agent_owner_v1(p_agent_key)); CP403 under another user''s agent id.';
comment on function cpa.agent_fail_v1 is 'cpa.todo_fail_v2 for the ToDos the agent holds (owner private.agent_owner_v1(p_agent_key)); CP403 under another user''s agent id.';
comment on function cpa.agent_release_v1 is 'cpa.todo_release_v2 for the ToDos the agent holds (owner private.agent_owner_v1(p_agent_key)); CP403 under another user''s agent id.';
comment on function cpa.job_cancel_v2 is 'Cancel a job: its unstarted and running ToDos are cancelled before the job (its event is the last). Takes the job''s gate exclusively, then its row, then its ToDos by id.';

-- Submit: one definition each -------------------------------------------------------------------

-- job_create_v2 ran job_create_v1, then set the job's and ToDos' timing columns.
create or replace function cpa.job_create_v2(
  p_tenant_id uuid, p_request text, p_intent text, p_todos jsonb,
  p_idempotency_key text default null, p_priority integer default 0,
  p_max_retries integer default 3, p_run_at timestamptz default null,
  p_time_zone text default 'UTC'
) returns public.jobs
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_job public.jobs;
begin
  perform private.tenant_authorize_v1(p_tenant_id);
  if jsonb_typeof(p_todos) is distinct from 'array' or jsonb_array_length(p_todos) = 0 then
    raise exception 'A job needs a non-empty array of ToDos.' using errcode = '22023';
  end if;
  if p_idempotency_key is not null then
    -- A repeated idempotency key answers the job an earlier transaction made: leave it alone.
    select * into v_job from public.jobs j
     where j.tenant_id = p_tenant_id and j.idempotency_key = p_idempotency_key;
    if found then
      return v_job;
    end if;
  end if;

  insert into public.jobs (tenant_id, created_by, request, intent, priority, idempotency_key,
                           todo_count, max_retries, run_at, time_zone)
  values (p_tenant_id, (select auth.uid()), p_request, p_intent, p_priority, p_idempotency_key,
          jsonb_array_length(p_todos), p_max_retries, p_run_at, coalesce(p_time_zone, 'UTC'))
  on conflict (tenant_id, idempotency_key) where idempotency_key is not null do nothing
  returning * into v_job;
  if v_job.id is null then
    -- A concurrent request with the same key won the race: answer with its job.
    select * into v_job from public.jobs j
     where j.tenant_id = p_tenant_id and j.idempotency_key = p_idempotency_key;
    return v_job;
  end if;

  perform private.todos_insert_v1(v_job.id, p_tenant_id, p_priority, 0, p_todos);
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
revoke execute on function cpa.job_create_v2(uuid, text, text, jsonb, text, integer, integer, timestamp with time zone, text) from public, anon;
grant execute on function cpa.job_create_v2(uuid, text, text, jsonb, text, integer, integer, timestamp with time zone, text) to authenticated, service_role;
-- job_submit_v3 sent keyed requests to job_submit_v1 (job_create_v2, the trace, the rate limit
-- and the job read back as JSON); that path is now a branch here, sharing the tenant, the rate
-- limit and the answer with the direct path.
create or replace function cpa.job_submit_v3(
  p_tenant_id uuid, p_request text, p_intent text, p_todos jsonb,
  p_idempotency_key text default null, p_priority integer default 0,
  p_max_retries integer default 3, p_run_at timestamptz default null,
  p_time_zone text default 'UTC', p_traceparent text default null,
  p_rate_limit integer default null, p_rate_window integer default 60
) returns jsonb
language plpgsql
security definer
set search_path = ''
set "TimeZone" = 'UTC'
as $$
declare
  v_tenant uuid := p_tenant_id;
  v_id uuid := gen_random_uuid();
  v_direct boolean := false;
  v_job public.jobs;
  v_todos jsonb;
  v_events jsonb;
  v_edges integer;
  v_expected integer;
  v_key text;
  v_start timestamptz;
  v_hits integer;
begin
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

  if p_idempotency_key is not null then
    -- A keyed request may answer an earlier job: job_create_v2 finds it, or makes the job (its
    -- events staged for the flush), and the ToDos are read back.
    v_job := cpa.job_create_v2(v_tenant, p_request, p_intent, p_todos, p_idempotency_key,
                               p_priority, p_max_retries, p_run_at, p_time_zone);
    if p_traceparent is not null and v_job.traceparent is null then
      -- First trace wins (as cpa.job_trace_v1): a repeated key keeps the original trace.
      update public.jobs j set traceparent = p_traceparent
       where j.id = v_job.id and j.traceparent is null
      returning * into v_job;
    end if;
    select jsonb_agg(jsonb_build_object(
             'id', t.id, 'key', t.key, 'action', t.action, 'target', t.target,
             'status', t.status,
             'depends_on', coalesce((select jsonb_agg(p.key order by p.key)
                                       from public.todo_edges e
                                       join public.todos p on p.id = e.depends_on_id
                                      where e.todo_id = t.id), '[]'::jsonb),
             'params', t.params, 'result', t.result, 'error', t.error,
             'attempts', t.attempts, 'started_at', t.started_at,
             'finished_at', t.finished_at,
             'requires_confirmation', t.requires_confirmation,
             'run_at', t.run_at)
           order by t.position)
      into v_todos
      from public.todos t where t.job_id = v_job.id;
  else
    -- Small jobs write their events here (20261128000800_submit_events_direct); larger ones are
    -- staged for the commit-time flush.
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

    -- Each ToDo with all of its columns at once, the answer from the inserted rows; and,
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
  end if;

  if p_rate_limit is not null then
    -- The fixed window of the rate limit, counted last.
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

  if p_idempotency_key is not null and not private.job_visible_v1(v_job.id) then
    raise exception 'The Idempotency-Key % belongs to another user''s job; use a new key.', left(p_idempotency_key, 200)
      using errcode = '55000';
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
    'todos', coalesce(v_todos, '[]'::jsonb));
end;
$$;
revoke execute on function cpa.job_submit_v3(uuid, text, text, jsonb, text, integer, integer, timestamp with time zone, text, text, integer, integer) from public, anon;
grant execute on function cpa.job_submit_v3(uuid, text, text, jsonb, text, integer, integer, timestamp with time zone, text, text, integer, integer) to authenticated, service_role;
comment on function cpa.job_submit_v3 is 'POST /v1/jobs in one call: the caller''s tenant, the job with its graph, run_at, zone and trace context, the Postgres rate limit (CP429), and the job as JSON naming created_by. A new job of up to 100 ToDos writes its events and their Realtime broadcast (tenant and owner''s user topic) itself instead of staging them for the commit-time flush; a keyed request goes through cpa.job_create_v2 and may answer an earlier job of the caller''s (another user''s key: 55000).';

-- A ToDo's start time: one row trigger -----------------------------------------------------------

-- todos_hold_until_run_at kept run_after at or after run_at; todos_park, which fired after it
-- (row triggers fire in name order), parked a ready ToDo not yet due. One function does both, in
-- that order. It fires on status changes too; run_after >= run_at already holds there.
create function private.todos_start_v1()
returns trigger
language plpgsql
set search_path = ''
as $$
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
revoke execute on function private.todos_start_v1() from public, anon;
comment on function private.todos_start_v1 is 'A ToDo never starts before its run_at (run_after is raised to it), and one that is ready but not yet due is parked: the claims'' index leaves it out until a claim finds it due.';

drop trigger todos_hold_until_run_at on public.todos;
drop trigger todos_park on public.todos;
create trigger todos_start
  before insert or update of status, run_after, run_at on public.todos
  for each row when (new.run_at is not null or new.status = 'ready')
  execute function private.todos_start_v1();

-- Callers that named the wrappers call what the wrappers ran ------------------------------------
create or replace function cpa.agent_claim_v2(p_tenant_id uuid, p_agent_key text, p_actions text[], p_limit integer, p_lease_seconds double precision default 300)
returns setof public.todos
language plpgsql
security definer
set search_path = ''
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
revoke execute on function cpa.agent_claim_v2(uuid, text, text[], integer, double precision) from public, anon;
grant execute on function cpa.agent_claim_v2(uuid, text, text[], integer, double precision) to authenticated, service_role;

create or replace function cpa.todo_reclaim_dead_v1(p_owners text[])
returns integer
language plpgsql
security definer
set search_path = ''
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
    perform private.todo_expire_v3(greatest(v_count, 100));
  end if;
  return v_count;
end;
$$;
revoke execute on function cpa.todo_reclaim_dead_v1(text[]) from public, anon;
revoke execute on function cpa.todo_reclaim_dead_v1(text[]) from authenticated;
grant execute on function cpa.todo_reclaim_dead_v1(text[]) to service_role;

create or replace function private.todo_claim_pick_v1(p_target text, p_owner text, p_limit integer, p_lease_seconds double precision default 60, p_tenant_id uuid default null, p_actions text[] default null, p_tenant_cap integer default null)
returns setof public.todos
language plpgsql
security definer
set search_path = ''
set random_page_cost = '1.1'
as $$
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
revoke execute on function private.todo_claim_pick_v1(text, text, integer, double precision, uuid, text[], integer) from public, anon;

create or replace function private.todo_jobs_gate_v1(p_todo_ids uuid[], p_exclusive boolean)
returns uuid[]
language plpgsql
security definer
set search_path = ''
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
    perform cpa.job_gate_v1(v_jobs);
  else
    perform cpa.job_gate_v1('{}', v_jobs);
  end if;
  return v_jobs;
end;
$$;
revoke execute on function private.todo_jobs_gate_v1(uuid[], boolean) from public, anon;


-- The helpers and old versions left without a caller ---------------------------------------------
drop function private.job_attach_inner_v1(uuid, jsonb);
drop function private.job_cancel_inner_v2(uuid);
drop function private.job_retry_inner_v3(uuid);
drop function private.job_route_inner_v2(uuid, text);
drop function private.todo_confirm_inner_v2(uuid, boolean);
drop function private.job_gate_v1(uuid[], uuid[]);
drop function private.agent_key_check_v1(text);
drop function cpa.todo_complete_v1(jsonb);
drop function cpa.todo_fail_v1(jsonb, double precision);
drop function cpa.todo_release_v1(jsonb, boolean, integer);
drop function cpa.todo_claim_v2(text, text, integer, double precision, uuid, text[], integer);
drop function cpa.job_submit_v1(uuid, text, text, jsonb, text, integer, integer,
  timestamp with time zone, text, text, integer, integer);
drop function cpa.job_create_v1(uuid, text, text, jsonb, text, integer, integer);
drop function private.todo_expire_v1(integer);
drop function private.todo_expire_v2(integer);
drop function private.todos_hold_until_run_at_v1();
drop function private.todos_park_v1();
comment on function private.todo_claim_pick_v1 is 'The claim of cpa.todo_claim_v3 without starting the jobs: expired leases first, parked ToDos that came due un-parked, fair across tenants, at most p_tenant_cap running per tenant, FOR UPDATE SKIP LOCKED; the caller starts the claimed ToDos'' pending jobs.';
