-- Invariants enforced by the database itself, whoever inserts the ToDos: the API validates
-- graphs before it creates them, but SQL is the last line (a direct call, a future job-creation
-- function, a planner attach). Checked by statement-level triggers over transition tables on
-- todos and todo_edges, so any job-creation function gets them without being redefined, and a
-- 500-ToDo graph costs one pass over its rows rather than one query per row:
-- - a job holds at most 1000 ToDos (500 in a submitted graph, plus what a plan attaches);
-- - keys are 1-64 characters of [A-Za-z0-9_.-];
-- - the action is in the catalogue (private.catalogue_actions), with its target, and an action
--   that requires confirmation is created requiring it;
-- - params are an object of at most 256 KiB, nested at most 64 levels, within the catalogue's
--   bounds for the action (required and unknown keys, numeric ranges, string lengths, enums);
-- - dependencies stay inside one job and form no cycle.
-- The catalogue table mirrors actions.yaml: rows here for the shipped catalogue, and
-- `cpa-scheduler migrate` upserts the YAML it ships, so the two cannot drift apart locally.

-- catalogue ------------------------------------------------------------------------------------
create table private.catalogue_actions (
  name text primary key check (length(name) between 1 and 64),
  target text not null check (target in ('cloud', 'desktop')),
  requires_confirmation boolean not null default false,
  params_schema jsonb not null default '{"type": "object"}'::jsonb,
  updated_at timestamptz not null default now()
);
comment on table private.catalogue_actions is 'The action catalogue (actions.yaml) as the database enforces it on every ToDo insert.';

insert into private.catalogue_actions (name, target, requires_confirmation, params_schema) values
  ('noop', 'cloud', false, '{"type":"object","properties":{"duration_ms":{"type":"integer","minimum":0,"maximum":60000}}}'),
  ('wait', 'cloud', false, '{"type":"object","required":["seconds"],"additionalProperties":false,"properties":{"seconds":{"type":"number","minimum":0,"maximum":2592000}}}'),
  ('notify', 'cloud', false, '{"type":"object","required":["message"],"additionalProperties":false,"properties":{"title":{"type":"string","maxLength":200},"message":{"type":"string","maxLength":4000},"level":{"enum":["info","success","warning","error"]}}}'),
  ('http.request', 'cloud', false, '{"type":"object","required":["url"],"additionalProperties":false,"properties":{"url":{"type":"string","pattern":"^https?://","maxLength":2000},"method":{"enum":["GET","POST","PUT","PATCH","DELETE","HEAD"]},"headers":{"type":"object","additionalProperties":{"type":"string"}},"json":{},"body":{"type":"string","maxLength":100000},"timeout":{"type":"number","minimum":0.1,"maximum":60}}}'),
  ('llm.generate', 'cloud', false, '{"type":"object","required":["prompt"],"additionalProperties":false,"properties":{"prompt":{"type":"string","minLength":1,"maxLength":20000},"inputs":{},"system":{"type":"string","maxLength":4000},"max_tokens":{"type":"integer","minimum":1,"maximum":8000}}}'),
  ('plan', 'cloud', false, '{"type":"object","required":["request"],"additionalProperties":false,"properties":{"request":{"type":"string","minLength":1,"maxLength":4000},"context":{"type":"object"}}}'),
  ('desktop.open_app', 'desktop', false, '{"type":"object","required":["app"],"additionalProperties":false,"properties":{"app":{"type":"string","minLength":1,"maxLength":200},"args":{"type":"array","items":{"type":"string"}}}}'),
  ('web.open', 'desktop', false, '{"type":"object","required":["url"],"additionalProperties":false,"properties":{"url":{"type":"string","minLength":1,"maxLength":2000}}}'),
  ('web.search', 'desktop', false, '{"type":"object","required":["query"],"additionalProperties":false,"properties":{"query":{"type":"string","minLength":1,"maxLength":500},"limit":{"type":"integer","minimum":1,"maximum":20}}}'),
  ('file.read', 'desktop', false, '{"type":"object","required":["path"],"additionalProperties":false,"properties":{"path":{"type":"string","minLength":1,"maxLength":1000}}}'),
  ('file.write', 'desktop', false, '{"type":"object","required":["path","content"],"additionalProperties":false,"properties":{"path":{"type":"string","minLength":1,"maxLength":1000},"content":{}}}'),
  ('file.organize', 'desktop', false, '{"type":"object","required":["folder"],"additionalProperties":false,"properties":{"folder":{"type":"string","minLength":1,"maxLength":1000},"by":{"enum":["type","date","name"]}}}'),
  ('email.send', 'desktop', true, '{"type":"object","required":["to","subject","body"],"additionalProperties":false,"properties":{"to":{"type":"string","minLength":1,"maxLength":500},"subject":{"type":"string","maxLength":500},"body":{}}}'),
  ('email.list_unread', 'desktop', false, '{"type":"object","additionalProperties":false,"properties":{"limit":{"type":"integer","minimum":1,"maximum":100}}}'),
  ('calendar.create_event', 'desktop', false, '{"type":"object","required":["title","start"],"additionalProperties":false,"properties":{"title":{"type":"string","minLength":1,"maxLength":500},"start":{"type":"string","minLength":1,"maxLength":200},"end":{"type":"string","maxLength":200},"attendees":{"type":"string","maxLength":1000},"location":{"type":"string","maxLength":500}}}'),
  ('calendar.list_events', 'desktop', false, '{"type":"object","additionalProperties":false,"properties":{"period":{"type":"string","maxLength":100}}}'),
  ('calendar.find_slot', 'desktop', false, '{"type":"object","required":["duration_minutes"],"additionalProperties":false,"properties":{"duration_minutes":{"type":"integer","minimum":5,"maximum":480},"within":{"type":"string","maxLength":100},"attendees":{"type":"string","maxLength":1000}}}'),
  ('reminder.create', 'desktop', false, '{"type":"object","required":["text","at"],"additionalProperties":false,"properties":{"text":{"type":"string","minLength":1,"maxLength":1000},"at":{"type":"string","minLength":1,"maxLength":200}}}'),
  ('notes.create', 'desktop', false, '{"type":"object","required":["text"],"additionalProperties":false,"properties":{"title":{"type":"string","maxLength":200},"text":{}}}')
on conflict (name) do update
   set target = excluded.target, requires_confirmation = excluded.requires_confirmation,
       params_schema = excluded.params_schema, updated_at = now();

-- helpers --------------------------------------------------------------------------------------
-- Nesting depth of a JSON value (a scalar is 0), stopping once past p_limit.
create function private.jsonb_depth_v1(p_value jsonb, p_limit integer default 64)
returns integer
language sql immutable parallel safe set search_path = ''
as $$
  with recursive walk(v, d) as (
    select p_value, 0
    union all
    select c.v, w.d + 1
      from walk w
      cross join lateral (
        select o.value as v from jsonb_each(case when jsonb_typeof(w.v) = 'object' then w.v end) o
        union all
        select a.value from jsonb_array_elements(case when jsonb_typeof(w.v) = 'array' then w.v end) a
      ) c
     where w.d <= p_limit and jsonb_typeof(c.v) in ('object', 'array')
  )
  select coalesce(max(d), 0) + case when jsonb_typeof(p_value) in ('object', 'array') then 1 else 0 end
    from walk
$$;

-- The first way params break the catalogue's schema for the action, or null. Covers the
-- keywords the catalogue uses at the top level; a {"$ref": ...} value stands for any value.
create function private.params_violation_v1(p_schema jsonb, p_params jsonb)
returns text
language sql immutable parallel safe set search_path = ''
as $$
  select coalesce(
    (select format('params must be a JSON object, not %s', jsonb_typeof(p_params))
      where jsonb_typeof(p_params) <> 'object'),
    (select format('params.%s is required', r.key)
       from jsonb_array_elements_text(coalesce(p_schema -> 'required', '[]')) as r(key)
      where not p_params ? r.key limit 1),
    (select format('params.%s is not a parameter of this action', p.key)
       from jsonb_each(p_params) p
      where p_schema -> 'additionalProperties' = 'false'::jsonb
        and not coalesce(p_schema -> 'properties', '{}') ? p.key limit 1),
    (select format('params.%s is %s, outside %s..%s', p.key, p.value,
                   coalesce(s.value ->> 'minimum', '-inf'), coalesce(s.value ->> 'maximum', 'inf'))
       from jsonb_each(p_params) p
       join jsonb_each(coalesce(p_schema -> 'properties', '{}')) s on s.key = p.key
      where jsonb_typeof(p.value) = 'number'
        and ((s.value ? 'minimum' and p.value::text::numeric < (s.value ->> 'minimum')::numeric)
          or (s.value ? 'maximum' and p.value::text::numeric > (s.value ->> 'maximum')::numeric))
      limit 1),
    (select format('params.%s has %s characters, more than %s', p.key, length(p.value #>> '{}'),
                   s.value ->> 'maxLength')
       from jsonb_each(p_params) p
       join jsonb_each(coalesce(p_schema -> 'properties', '{}')) s on s.key = p.key
      where jsonb_typeof(p.value) = 'string' and s.value ? 'maxLength'
        and length(p.value #>> '{}') > (s.value ->> 'maxLength')::integer
      limit 1),
    (select format('params.%s is %s, not one of %s', p.key, p.value, s.value -> 'enum')
       from jsonb_each(p_params) p
       join jsonb_each(coalesce(p_schema -> 'properties', '{}')) s on s.key = p.key
      where s.value ? 'enum' and not (p.value <@ (s.value -> 'enum'))
        and not (jsonb_typeof(p.value) = 'object' and p.value ? '$ref')
      limit 1)
  )
$$;

-- ToDos inserted by one statement.
create function private.todos_check_insert_v1()
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
             when octet_length(n.params::text) > 262144 then
               format('The params of ToDo %s are %s bytes; at most 256 KiB are allowed.', n.key,
                      octet_length(n.params::text))
             when private.jsonb_depth_v1(n.params) > 64 then
               format('The params of ToDo %s are nested deeper than 64 levels.', n.key)
             else
               (select format('The ToDo %s has invalid params for %s: %s.', n.key, n.action, v)
                  from private.params_violation_v1(a.params_schema, n.params) v where v is not null)
           end
      into v_problem
      from new_todos n
      left join private.catalogue_actions a on a.name = n.action
     where n.key !~ '^[A-Za-z0-9_.\-]{1,64}$'
        or a.name is null or a.target <> n.target
        or (a.requires_confirmation and not n.requires_confirmation)
        or octet_length(n.params::text) > 262144
        or private.jsonb_depth_v1(n.params) > 64
        or private.params_violation_v1(a.params_schema, n.params) is not null
     limit 1;
  end if;
  if v_problem is not null then
    raise exception '%', v_problem using errcode = '22023';
  end if;
  return null;
end;
$$;

-- Dependencies inserted by one statement: same job, and no cycle in any job they touch
-- (Kahn's algorithm over the job's edges: O(ToDos + edges) per job).
create function private.todo_edges_check_insert_v1()
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
    select array_agg(t.id order by t.id) into v_ids from public.todos t where t.job_id = v_job;
    v_n := coalesce(array_length(v_ids, 1), 0);
    -- Edges as (parent index, child index), sorted by parent so each node's dependents are a run.
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

-- grants ---------------------------------------------------------------------------------------
revoke all on private.catalogue_actions from public, anon, authenticated;
grant select on private.catalogue_actions to service_role;
revoke execute on function private.jsonb_depth_v1(jsonb, integer) from public;
revoke execute on function private.params_violation_v1(jsonb, jsonb) from public;
revoke execute on function private.todos_check_insert_v1() from public;
revoke execute on function private.todo_edges_check_insert_v1() from public;

-- row level security ---------------------------------------------------------------------------
alter table private.catalogue_actions enable row level security;
-- No policies: read by the security definer triggers above, written by migrations.

-- triggers and constraints ---------------------------------------------------------------------
create trigger todos_check_insert
  after insert on public.todos
  referencing new table as new_todos
  for each statement execute function private.todos_check_insert_v1();

create trigger todo_edges_check_insert
  after insert on public.todo_edges
  referencing new table as new_edges
  for each statement execute function private.todo_edges_check_insert_v1();

-- Bounds on numbers the API never lets through; not valid: rows from before stay readable.
alter table public.jobs
  add constraint jobs_priority_bounds check (priority between -1000 and 1000) not valid,
  add constraint jobs_max_retries_bounds check (max_retries between 0 and 25) not valid,
  add constraint jobs_request_length check (length(request) <= 20000) not valid,
  add constraint jobs_intent_length check (length(intent) <= 200) not valid;
alter table public.todos
  add constraint todos_priority_bounds check (priority between -1000 and 1000) not valid;
alter table public.todos
  add constraint todos_assigned_agent_length check (length(assigned_agent) <= 200) not valid;
alter table public.agents
  add constraint agents_name_length check (length(name) <= 200) not valid,
  add constraint agents_actions_count check (cardinality(actions) <= 200) not valid;
