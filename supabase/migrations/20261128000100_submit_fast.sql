-- POST /v1/jobs, cheaper (issue 15: its p50 was about 3x the bare insert route's).
-- Same answers, same errors, same checks; less work per job:
-- 1. The ToDo invariants (20261127000510_invariants) called two SQL functions per row,
--    private.params_violation_v1 and private.jsonb_depth_v1. Functions with their own
--    search_path are never inlined, so both were planned again in every statement and ran
--    per row; that was about half of the whole create. private.todos_check_insert_v2 tests the
--    catalogue's bounds inline in its one query (planned once per session), walks the nesting
--    depth only of params longer than 129 bytes (a depth above 64 needs 65 opening and 65
--    closing brackets), and calls the v1 helpers only to word the error of the row that breaks
--    a rule: the same rows are refused with the same messages.
-- 2. The cycle check (private.todo_edges_check_insert_v2) first asks whether every edge of the
--    job points to a ToDo listed earlier (a lower position). Positions then are a topological
--    order, so there is no cycle and Kahn's algorithm is skipped; otherwise it runs as before.
-- 3. cpa.job_submit_v2 (the API's call now): v1 created the job through job_create_v2, which
--    inserted the job and its ToDos and then updated both for run_at, the zone, agent timeouts
--    and optional ToDos, updated the job again for the trace context, and read the ToDos and
--    their edges back for the answer. v2 inserts each row once with all of its columns and
--    answers from the inserted rows. A chosen tenant is authorized as before
--    (private.tenant_authorize_v1); the caller's oldest membership needs no second check. A
--    request with an Idempotency-Key (which may answer an earlier job) is v1's, unchanged.
--    The job's audit row now records run_at, zone and trace context from the start (v1 added
--    them by updates, which the audit does not record).
-- 4. The events flush at commit (private.job_events_flush_v2) runs with generic plans. Its
--    queries take the transaction's job ids as an array, whose size the planner guesses only
--    for a custom plan; a custom plan was cheaper than the generic one on paper, so every flush
--    planned its statements again (about a quarter of its time). The generic plans probe jobs
--    by primary key whatever the array's size, which also suits a flush of many jobs.
-- The triggers move to the _v2 functions; the _v1 functions stay (migrations are append-only).

-- ToDo invariants ------------------------------------------------------------------------------
create function private.todos_check_insert_v2()
returns trigger
language plpgsql security definer set search_path = ''
as $$
declare
  v_problem text;
begin
  select format('The job %s would hold %s ToDos; at most 1000 are allowed.', j.job_id, j.n)
    into v_problem
    from (select n.job_id, (select count(*) from public.todos t where t.job_id = n.job_id) as n
            from (select distinct job_id from new_todos) n) j
   where j.n > 1000
   limit 1;
  if v_problem is null then
    select case
             when n.key !~ '^[A-Za-z0-9_.\-]{1,64}$' then
               format('The ToDo key %s is not 1-64 characters of letters, digits, _ . or -.',
                      left(n.key, 80))
             when a.name is null then
               format('The ToDo %s uses the unknown action %s.', n.key, left(n.action, 80))
             when a.target <> n.target then
               format('The ToDo %s runs %s on %s, but that action runs on %s.', n.key, n.action,
                      n.target, a.target)
             when a.requires_confirmation and not n.requires_confirmation then
               format('The ToDo %s uses %s, which needs the user''s confirmation.', n.key, n.action)
             when z.bytes > 262144 then
               format('The params of ToDo %s are %s bytes; at most 256 KiB are allowed.', n.key,
                      z.bytes)
             when z.bytes > 129 and private.jsonb_depth_v1(n.params) > 64 then
               format('The params of ToDo %s are nested deeper than 64 levels.', n.key)
             else
               (select format('The ToDo %s has invalid params for %s: %s.', n.key, n.action, v)
                  from private.params_violation_v1(a.params_schema, n.params) v where v is not null)
           end
      into v_problem
      from new_todos n
      left join private.catalogue_actions a on a.name = n.action
      cross join lateral (select octet_length(n.params::text) as bytes) z
     where n.key !~ '^[A-Za-z0-9_.\-]{1,64}$'
        or a.name is null or a.target <> n.target
        or (a.requires_confirmation and not n.requires_confirmation)
        or z.bytes > 262144
        or (z.bytes > 129 and private.jsonb_depth_v1(n.params) > 64)
        or case
             when jsonb_typeof(n.params) <> 'object' then true
             when not (n.params ?& array(select jsonb_array_elements_text(
                                           coalesce(a.params_schema -> 'required', '[]')))) then true
             else exists (
               select 1
                 from jsonb_each(n.params) p
                 cross join lateral (select a.params_schema -> 'properties' -> p.key as s) s
                where (a.params_schema -> 'additionalProperties' = 'false'::jsonb
                       and not coalesce(a.params_schema -> 'properties', '{}') ? p.key)
                   or (jsonb_typeof(p.value) = 'number'
                       and ((s.s ? 'minimum' and p.value::text::numeric < (s.s ->> 'minimum')::numeric)
                         or (s.s ? 'maximum' and p.value::text::numeric > (s.s ->> 'maximum')::numeric)))
                   or (jsonb_typeof(p.value) = 'string' and s.s ? 'maxLength'
                       and length(p.value #>> '{}') > (s.s ->> 'maxLength')::integer)
                   or (s.s ? 'enum' and not (p.value <@ (s.s -> 'enum'))
                       and not (jsonb_typeof(p.value) = 'object' and p.value ? '$ref')))
           end
     limit 1;
  end if;
  if v_problem is not null then
    raise exception '%', v_problem using errcode = '22023';
  end if;
  return null;
end;
$$;
comment on function private.todos_check_insert_v2 is 'The ToDo invariants of 20261127000510 for the ToDos one statement inserted, with the params bounds inline.';
revoke execute on function private.todos_check_insert_v2() from public, anon, authenticated, service_role;

-- dependencies --------------------------------------------------------------------------------
create function private.todo_edges_check_insert_v2()
returns trigger
language plpgsql security definer set search_path = ''
as $$
declare
  v_job uuid;
  v_ids uuid[];
  v_n integer;
  v_parent integer[];
  v_child integer[];
  v_indeg integer[];
  v_start integer[];
  v_queue integer[];
  v_head integer;
  v_seen integer;
  v_node integer;
  v_i integer;
begin
  if exists (select 1 from new_edges e
               join public.todos c on c.id = e.todo_id
               join public.todos p on p.id = e.depends_on_id
              where c.job_id <> p.job_id or c.tenant_id <> e.tenant_id) then
    raise exception 'A ToDo may only depend on ToDos of its own job.' using errcode = '22023';
  end if;
  for v_job in select distinct c.job_id from new_edges e join public.todos c on c.id = e.todo_id loop
    if not exists (select 1 from public.todos c
                     join public.todo_edges e on e.todo_id = c.id
                     join public.todos p on p.id = e.depends_on_id
                    where c.job_id = v_job and p.position >= c.position) then
      continue;
    end if;
    select array_agg(t.id order by t.id) into v_ids from public.todos t where t.job_id = v_job;
    v_n := coalesce(array_length(v_ids, 1), 0);
    select array_agg(array_position(v_ids, e.depends_on_id) order by e.depends_on_id, e.todo_id),
           array_agg(array_position(v_ids, e.todo_id) order by e.depends_on_id, e.todo_id)
      into v_parent, v_child
      from public.todo_edges e join public.todos c on c.id = e.todo_id
     where c.job_id = v_job;
    if v_parent is null then
      continue;
    end if;
    v_indeg := array_fill(0, array[v_n]);
    v_start := array_fill(0, array[v_n + 1]);
    for v_i in 1 .. array_length(v_child, 1) loop
      v_indeg[v_child[v_i]] := v_indeg[v_child[v_i]] + 1;
      if v_start[v_parent[v_i]] = 0 then
        v_start[v_parent[v_i]] := v_i;
      end if;
    end loop;
    v_queue := array(select i from generate_series(1, v_n) i where v_indeg[i] = 0);
    v_head := 1;
    v_seen := 0;
    while v_head <= coalesce(array_length(v_queue, 1), 0) loop
      v_node := v_queue[v_head];
      v_head := v_head + 1;
      v_seen := v_seen + 1;
      v_i := v_start[v_node];
      if v_i > 0 then
        while v_i <= array_length(v_parent, 1) and v_parent[v_i] = v_node loop
          v_indeg[v_child[v_i]] := v_indeg[v_child[v_i]] - 1;
          if v_indeg[v_child[v_i]] = 0 then
            v_queue := v_queue || v_child[v_i];
          end if;
          v_i := v_i + 1;
        end loop;
      end if;
    end loop;
    if v_seen < v_n then
      raise exception 'The dependencies of job % form a cycle; a job must be a DAG.', v_job
        using errcode = '22023';
    end if;
  end loop;
  return null;
end;
$$;
comment on function private.todo_edges_check_insert_v2 is 'Dependencies inserted by one statement: same job, and no cycle (no search when every edge points to an earlier ToDo).';
revoke execute on function private.todo_edges_check_insert_v2() from public, anon, authenticated, service_role;

-- POST /v1/jobs -------------------------------------------------------------------------------
create function cpa.job_submit_v2(
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
  v_job public.jobs;
  v_todos jsonb;
  v_edges integer;
  v_expected integer;
  v_key text;
  v_start timestamptz;
  v_hits integer;
begin
  if p_idempotency_key is not null then
    -- A keyed request may answer an earlier job: v1 keeps that path.
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

  insert into public.jobs (tenant_id, created_by, request, intent, priority, todo_count,
                           max_retries, run_at, time_zone, traceparent)
  values (v_tenant, (select auth.uid()), p_request, p_intent, p_priority,
          jsonb_array_length(p_todos), p_max_retries, p_run_at, coalesce(p_time_zone, 'UTC'),
          p_traceparent)
  returning * into v_job;

  -- Each ToDo with all of its columns at once (v1 inserted, then updated run_at, the agent
  -- timeout and optional); the answer is built from the inserted rows (position = the item's
  -- place in p_todos, from 1).
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
  )
  select jsonb_agg(jsonb_build_object(
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
         order by t.position)
    into v_todos
    from ins t;

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
    -- As v1: the fixed window of the rate limit, counted last (the row stays locked only from
    -- here to the commit); past the limit the job rolls back with the count.
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
comment on function cpa.job_submit_v2 is 'POST /v1/jobs in one call, each row inserted once: choose the caller''s tenant, create the job with its ToDos and trace context, count the Postgres rate limit (CP429 past it) and answer the job with its ToDos as JSON. Keyed requests go to job_submit_v1.';
revoke execute on function cpa.job_submit_v2(uuid, text, text, jsonb, text, integer, integer, timestamptz, text, text, integer, integer) from public, anon;
grant execute on function cpa.job_submit_v2(uuid, text, text, jsonb, text, integer, integer, timestamptz, text, text, integer, integer) to authenticated, service_role;

-- triggers -------------------------------------------------------------------------------------
drop trigger todos_check_insert on public.todos;
create trigger todos_check_insert
  after insert on public.todos
  referencing new table as new_todos
  for each statement execute function private.todos_check_insert_v2();

drop trigger todo_edges_check_insert on public.todo_edges;
create trigger todo_edges_check_insert
  after insert on public.todo_edges
  referencing new table as new_edges
  for each statement execute function private.todo_edges_check_insert_v2();

-- plans of the events flush ---------------------------------------------------------------------
alter function private.job_events_flush_v2() set plan_cache_mode = 'force_generic_plan';
