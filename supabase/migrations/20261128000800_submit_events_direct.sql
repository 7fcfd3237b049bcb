-- POST /v1/jobs writes the new job's events itself, without the commit-time flush (issue 15).
--
-- Since 20261127110000_events_flush every event is staged in its transaction and given its id
-- at commit by private.job_events_flush_v3, under a per-job advisory lock: that is what makes
-- the ids of one job commit in id order when several transactions write events of the same
-- job. A job created by the transaction itself does not need it: no other transaction can see
-- the job (or write an event of it) before this one commits, and a later transaction takes its
-- ids from the sequence after ours. So cpa.job_submit_v3 inserts the new job's events (the
-- job's, then its ToDos' in id order, as the triggers staged them) into public.job_events
-- directly, with their final ids, and sends their Realtime broadcast (one message, topic
-- 'tenant:<tenant_id>', event 'job_events', the same payload {"events": [...]}) in the same
-- transaction. The flush then has nothing to do: no staged rows, no marker row, no deferred
-- trigger, no advisory lock for the POST. Same rows, same ids order, same payload; a rollback
-- still takes everything with it.
--
-- How the triggers know: while job_submit_v3 inserts its job, ToDos and events, the
-- transaction-local setting cpa.events_direct holds the new job's id, and the status triggers
-- (private.jobs_events_v2, private.todos_events_v2) and the job_events restage trigger
-- (private.job_events_restage_v3) leave that job's inserted rows to it; every other row is
-- staged exactly as before. The setting is cleared before the function returns, so anything
-- later in the transaction (another statement on the same job) is staged and flushed at commit
-- with larger ids, as before. Only security definer functions and service_role insert into
-- jobs, todos and job_events (authenticated has no insert grant), and the setting only ever
-- names one job, created in this transaction.
--
-- Jobs of more than 100 ToDos keep the staged path: the flush cuts broadcasts larger than
-- 100 kB into several messages, and 101 events of the longest keys could come near that.
-- Keyed requests (Idempotency-Key) go to job_submit_v1, unchanged, as in v2.

-- Status triggers: leave the job being submitted to job_submit_v3 ------------------------------
create function private.jobs_events_v2()
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
    if v_direct <> '' and not exists (select 1 from new_rows n where n.id::text <> v_direct) then
      return null;  -- job_submit_v3 writes this job's event itself
    end if;
    perform private.job_events_stage_v1(array(
      select row(n.tenant_id, n.id, null, 'job.status', n.status,
                 jsonb_build_object('intent', n.intent), now())::private.job_event_draft
        from new_rows n where n.id::text is distinct from nullif(v_direct, '') order by n.id));
  else
    -- As v1: a completion updates its job's todos_done on every flush; the status changes
    -- only at the end: check first.
    if not exists (select 1 from new_rows n join old_rows o on o.id = n.id
                   where n.status is distinct from o.status) then
      return null;
    end if;
    perform private.job_events_stage_v1(array(
      select row(n.tenant_id, n.id, null, 'job.status', n.status,
                 jsonb_strip_nulls(jsonb_build_object('error', n.error, 'todos_done', n.todos_done,
                                                      'todo_count', n.todo_count)),
                 now())::private.job_event_draft
        from new_rows n join old_rows o on o.id = n.id
       where n.status is distinct from o.status
       order by n.id));
  end if;
  return null;
end;
$$;
comment on function private.jobs_events_v2 is 'Stage job status events (v1), except the inserted row of the job cpa.job_submit_v3 is creating (cpa.events_direct), whose event it writes itself.';
revoke execute on function private.jobs_events_v2() from public, anon, authenticated, service_role;

create function private.todos_events_v2()
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
    end if;
  end if;
  return null;
end;
$$;
comment on function private.todos_events_v2 is 'Stage ToDo status events and notify cpa_todo_ready (v1), except for the inserted ToDos of the job cpa.job_submit_v3 is creating (cpa.events_direct), whose events it writes itself.';
revoke execute on function private.todos_events_v2() from public, anon, authenticated, service_role;

-- Restage: leave the submitted job's direct events in place -----------------------------------
create function private.job_events_restage_v3()
returns trigger
language plpgsql security definer set search_path = ''
as $$
declare
  v_direct text;
begin
  -- The flush's own insert, and only that (as v2).
  if current_setting('cpa.events_flushing', true) = 'on' and pg_trigger_depth() > 1 then
    return null;
  end if;
  if not exists (select 1 from new_rows) then
    return null;
  end if;
  v_direct := nullif(coalesce(current_setting('cpa.events_direct', true), ''), '');
  if v_direct is not null
     and not exists (select 1 from new_rows n where n.job_id::text <> v_direct) then
    return null;  -- job_submit_v3's events of the job it is creating: final ids already
  end if;
  perform private.job_events_stage_v1(array(
    select row(n.tenant_id, n.job_id, n.todo_id, n.kind, n.status, n.data,
               n.created_at)::private.job_event_draft
      from new_rows n where n.job_id::text is distinct from v_direct order by n.id));
  delete from public.job_events e using new_rows n
   where e.id = n.id and n.job_id::text is distinct from v_direct;
  return null;
end;
$$;
comment on function private.job_events_restage_v3 is 'Move rows inserted into job_events outside the flush into the stage (v2), except the events cpa.job_submit_v3 writes for the job it is creating (cpa.events_direct).';
revoke execute on function private.job_events_restage_v3() from public, anon, authenticated, service_role;

-- POST /v1/jobs ---------------------------------------------------------------------------------
create function cpa.job_submit_v3(
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
    return cpa.job_submit_v1(p_tenant_id, p_request, p_intent, p_todos, p_idempotency_key,
                             p_priority, p_max_retries, p_run_at, p_time_zone, p_traceparent,
                             p_rate_limit, p_rate_window);
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
  end if;

  return jsonb_build_object(
    'id', v_job.id, 'tenant_id', v_job.tenant_id, 'status', v_job.status,
    'request', v_job.request, 'intent', v_job.intent, 'error', v_job.error,
    'created_at', v_job.created_at,
    'started_at', v_job.started_at,
    'completed_at', v_job.completed_at,
    'run_at', v_job.run_at, 'schedule_id', v_job.schedule_id,
    'todos', v_todos);
end;
$$;
comment on function cpa.job_submit_v3 is 'POST /v1/jobs in one call (as job_submit_v2), writing the new job''s events and their Realtime broadcast itself (jobs up to 100 ToDos) instead of staging them for the commit-time flush. Keyed requests go to job_submit_v1.';
revoke execute on function cpa.job_submit_v3(uuid, text, text, jsonb, text, integer, integer, timestamptz, text, text, integer, integer) from public, anon;
grant execute on function cpa.job_submit_v3(uuid, text, text, jsonb, text, integer, integer, timestamptz, text, text, integer, integer) to authenticated, service_role;

-- triggers -------------------------------------------------------------------------------------
drop trigger jobs_events_insert on public.jobs;
create trigger jobs_events_insert
  after insert on public.jobs
  referencing new table as new_rows
  for each statement execute function private.jobs_events_v2();
drop trigger jobs_events_update on public.jobs;
create trigger jobs_events_update
  after update on public.jobs
  referencing old table as old_rows new table as new_rows
  for each statement execute function private.jobs_events_v2();

drop trigger todos_events_insert on public.todos;
create trigger todos_events_insert
  after insert on public.todos
  referencing new table as new_rows
  for each statement execute function private.todos_events_v2();
drop trigger todos_events_update on public.todos;
create trigger todos_events_update
  after update on public.todos
  referencing old table as old_rows new table as new_rows
  for each statement execute function private.todos_events_v2();

drop trigger job_events_restage on public.job_events;
create trigger job_events_restage
  after insert on public.job_events
  referencing new table as new_rows
  for each statement execute function private.job_events_restage_v3();

-- The claims and the call in one statement ---------------------------------------------------
-- The API's POST sent two statements in one pipeline: the claims (role authenticated, the
-- verified JWT claims, statement_timeout, all transaction-local, as PostgREST sets them), then
-- the call. private.job_submit_as_v1 does both in one statement: it sets the same settings, then
-- calls cpa.job_submit_v3 in a statement of its own, so that call is authorized and runs as
-- authenticated with the claims, exactly as before. It is SECURITY INVOKER (a security
-- definer function may not change the role) and executable only by its owner, the role that
-- runs the migrations and the API (postgres): whoever may call it can pass any claims, as that
-- role can already set them itself. anon, authenticated and service_role may not call it.
-- statement_timeout only bounds statements that start after it is set, so it no longer bounds
-- this call: lock_timeout (read whenever a lock wait starts) bounds its waits for locks
-- instead; its work is bounded by the size limits of a job.
create function private.job_submit_as_v1(
  p_claims text,
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
) returns text
language plpgsql security invoker set search_path = ''
as $$
begin
  perform set_config('role', 'authenticated', true),
          set_config('request.jwt.claims', p_claims, true),
          set_config('statement_timeout', '8s', true),
          set_config('lock_timeout', '8s', true);
  return cpa.job_submit_v3(p_tenant_id, p_request, p_intent, p_todos, p_idempotency_key,
                           p_priority, p_max_retries, p_run_at, p_time_zone, p_traceparent,
                           p_rate_limit, p_rate_window)::text;
end;
$$;
comment on function private.job_submit_as_v1 is 'POST /v1/jobs in one statement for the API''s login role: set role authenticated and the verified claims for the transaction, then cpa.job_submit_v3 as that role. Owner only.';
revoke execute on function private.job_submit_as_v1(text, uuid, text, text, jsonb, text, integer, integer, timestamptz, text, text, integer, integer) from public, anon, authenticated, service_role;
