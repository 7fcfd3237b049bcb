-- Jobs and ToDos: the graph, its creation and what SQL refuses
--
-- A job owns 1-1000 ToDos joined by edges inside the job, acyclic; a ToDo is `ready`
-- exactly when `deps_remaining` reaches 0 (the completing transaction decrements it;
-- no claim reads the edges). Statement triggers refuse bad keys, actions outside
-- `private.catalogue_actions` (or on the wrong target, or without a required
-- confirmation), params over 256 KiB, deeper than 64 levels or out of the catalogue's
-- bounds; `run_after >= run_at` always. Job status runs pending -> running ->
-- done / failed / cancelled; an idempotency key is unique per tenant.
--
-- Generated from supabase/migrations by scripts/schemas.py; edit a migration (and
-- the header in that script), then run `python scripts/schemas.py write`.

set check_function_bodies = false;

-- FUNCTION private.uuid_v7_v1()
CREATE FUNCTION private.uuid_v7_v1() RETURNS uuid
    LANGUAGE sql PARALLEL SAFE
    SET search_path TO ''
    AS $$
  -- The first 6 bytes of a random (version 4) UUID become the time; bits 52 and 53 turn its
  -- version nibble from 4 (0100) into 7 (0111); the variant bits stay.
  select encode(
    set_bit(set_bit(
      overlay(uuid_send(gen_random_uuid())
              placing substring(int8send(floor(extract(epoch from clock_timestamp()) * 1000)::bigint)
                                from 3)
              from 1 for 6),
      52, 1), 53, 1),
    'hex')::uuid
$$;
-- COMMENT on FUNCTION private.uuid_v7_v1()
COMMENT ON FUNCTION private.uuid_v7_v1() IS 'A time-ordered UUID (version 7: Unix milliseconds, then random bits), the default id of new ToDos and jobs.';
-- ACL on FUNCTION private.uuid_v7_v1()
REVOKE ALL ON FUNCTION private.uuid_v7_v1() FROM PUBLIC;
GRANT ALL ON FUNCTION private.uuid_v7_v1() TO authenticated;
GRANT ALL ON FUNCTION private.uuid_v7_v1() TO service_role;

-- TABLE public.todos
CREATE TABLE public.todos (
    id uuid DEFAULT private.uuid_v7_v1() NOT NULL,
    job_id uuid NOT NULL,
    tenant_id uuid NOT NULL,
    key text NOT NULL,
    "position" integer DEFAULT 0 NOT NULL,
    action text NOT NULL,
    target text NOT NULL,
    params jsonb DEFAULT '{}'::jsonb NOT NULL,
    status text DEFAULT 'waiting'::text NOT NULL,
    priority integer DEFAULT 0 NOT NULL,
    attempts integer DEFAULT 0 NOT NULL,
    max_attempts integer DEFAULT 3 NOT NULL,
    requires_confirmation boolean DEFAULT false NOT NULL,
    confirmed_at timestamp with time zone,
    refusals integer DEFAULT 0 NOT NULL,
    assigned_agent text,
    run_after timestamp with time zone DEFAULT now() NOT NULL,
    timer_until timestamp with time zone,
    lease_owner text,
    lease_expires_at timestamp with time zone,
    result jsonb,
    error text,
    deps_remaining integer DEFAULT 0 NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    started_at timestamp with time zone,
    finished_at timestamp with time zone,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    run_at timestamp with time zone,
    agent_timeout_seconds integer,
    agent_noticed_at timestamp with time zone,
    optional boolean DEFAULT false NOT NULL,
    lost_leases integer DEFAULT 0 NOT NULL,
    parked boolean DEFAULT false NOT NULL,
    CONSTRAINT todos_agent_timeout_seconds_check CHECK (((agent_timeout_seconds >= 1) AND (agent_timeout_seconds <= 2592000))),
    CONSTRAINT todos_deps_remaining_check CHECK ((deps_remaining >= 0)),
    CONSTRAINT todos_lost_leases_check CHECK ((lost_leases >= 0)),
    CONSTRAINT todos_max_attempts_check CHECK (((max_attempts >= 1) AND (max_attempts <= 25))),
    CONSTRAINT todos_status_check CHECK ((status = ANY (ARRAY['waiting'::text, 'confirming'::text, 'ready'::text, 'running'::text, 'done'::text, 'failed'::text, 'cancelled'::text]))),
    CONSTRAINT todos_target_check CHECK ((target = ANY (ARRAY['cloud'::text, 'desktop'::text])))
)
WITH (fillfactor='80', autovacuum_vacuum_scale_factor='0.02');
-- COMMENT on TABLE public.todos
COMMENT ON TABLE public.todos IS 'One unit of work. waiting (dependencies open) -> confirming (needs approval) -> ready -> running (leased) -> done | failed | cancelled.';
-- COMMENT on COLUMN public.todos.assigned_agent
COMMENT ON COLUMN public.todos.assigned_agent IS 'A desktop agent this ToDo was routed to; only that agent may claim it (null: any agent of the tenant).';
-- COMMENT on COLUMN public.todos.deps_remaining
COMMENT ON COLUMN public.todos.deps_remaining IS 'Unfinished dependencies; completion decrements it and the ToDo is ready at 0.';
-- COMMENT on COLUMN public.todos.run_at
COMMENT ON COLUMN public.todos.run_at IS 'Earliest start (null: immediate). run_after never drops below it, so nothing claims the ToDo earlier.';
-- COMMENT on COLUMN public.todos.agent_timeout_seconds
COMMENT ON COLUMN public.todos.agent_timeout_seconds IS 'A desktop ToDo fails when no agent has taken it this long after it became ready.';
-- COMMENT on COLUMN public.todos.agent_noticed_at
COMMENT ON COLUMN public.todos.agent_noticed_at IS 'When the job was told that this desktop ToDo waits for an agent.';
-- COMMENT on COLUMN public.todos.optional
COMMENT ON COLUMN public.todos.optional IS 'Best effort: at its agent timeout the ToDo is skipped (done, result {"skipped": true}) instead of failing the job.';
-- COMMENT on COLUMN public.todos.lost_leases
COMMENT ON COLUMN public.todos.lost_leases IS 'Leases of this ToDo that expired or were reclaimed from a dead worker; they do not count against max_attempts (the budget is attempts - lost_leases), and at private.lost_lease_limit_v1() the ToDo fails.';
-- COMMENT on COLUMN public.todos.parked
COMMENT ON COLUMN public.todos.parked IS 'Ready but its run_after was in the future when it became ready; the claims leave it out (todos_due_idx) until one of them finds it due and clears the flag.';
-- CONSTRAINT public.todos todos_job_id_key_key
ALTER TABLE ONLY public.todos
    ADD CONSTRAINT todos_job_id_key_key UNIQUE (job_id, key);
-- CONSTRAINT public.todos todos_pkey
ALTER TABLE ONLY public.todos
    ADD CONSTRAINT todos_pkey PRIMARY KEY (id);
-- INDEX public.todos_due_idx
CREATE INDEX todos_due_idx ON public.todos USING btree (target, tenant_id, priority DESC, run_after) WHERE ((status = 'ready'::text) AND (NOT parked));
-- INDEX public.todos_lease_idx
CREATE INDEX todos_lease_idx ON public.todos USING btree (lease_expires_at) WHERE (status = 'running'::text);
-- INDEX public.todos_parked_idx
CREATE INDEX todos_parked_idx ON public.todos USING btree (target, run_after) WHERE ((status = 'ready'::text) AND parked);
-- INDEX public.todos_ready_run_after_idx
CREATE INDEX todos_ready_run_after_idx ON public.todos USING btree (target, run_after) WHERE (status = 'ready'::text);
-- INDEX public.todos_running_tenant_idx
CREATE INDEX todos_running_tenant_idx ON public.todos USING btree (tenant_id, target) WHERE (status = 'running'::text);
-- ROW SECURITY public.todos
ALTER TABLE public.todos ENABLE ROW LEVEL SECURITY;
-- ACL on TABLE public.todos
GRANT SELECT ON TABLE public.todos TO authenticated;
GRANT SELECT,INSERT,DELETE,UPDATE ON TABLE public.todos TO service_role;

-- FUNCTION cpa.idempotency_check_v1(uuid, text, text)
CREATE FUNCTION cpa.idempotency_check_v1(p_tenant_id uuid, p_key text, p_body_hash text) RETURNS boolean
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    AS $$
declare
  v_hash text;
  v_job uuid;
begin
  perform private.tenant_authorize_v1(p_tenant_id);
  insert into private.job_idempotency (tenant_id, key, body_hash)
  values (p_tenant_id, p_key, p_body_hash)
  on conflict (tenant_id, key) do nothing;
  if found then
    return true;
  end if;
  select i.body_hash into v_hash from private.job_idempotency i
   where i.tenant_id = p_tenant_id and i.key = p_key;
  if v_hash is distinct from p_body_hash then
    raise exception 'The Idempotency-Key % was first used with a different body; send the original body to get that job again, or use a new key for a new job.', left(p_key, 200)
      using errcode = '55000';
  end if;
  select j.id into v_job from public.jobs j where j.tenant_id = p_tenant_id and j.idempotency_key = p_key;
  if v_job is not null and not private.job_visible_v1(v_job) then
    raise exception 'The Idempotency-Key % belongs to another user''s job; use a new key.', left(p_key, 200)
      using errcode = '55000';
  end if;
  return false;
end;
$$;
-- COMMENT on FUNCTION cpa.idempotency_check_v1(p_tenant_id uuid, p_key text, p_body_hash text)
COMMENT ON FUNCTION cpa.idempotency_check_v1(p_tenant_id uuid, p_key text, p_body_hash text) IS 'Record the body hash of a new Idempotency-Key; true when new, false for a replay, 55000 for a different body or another user''s job.';
-- ACL on FUNCTION cpa.idempotency_check_v1(p_tenant_id uuid, p_key text, p_body_hash text)
REVOKE ALL ON FUNCTION cpa.idempotency_check_v1(p_tenant_id uuid, p_key text, p_body_hash text) FROM PUBLIC;
GRANT ALL ON FUNCTION cpa.idempotency_check_v1(p_tenant_id uuid, p_key text, p_body_hash text) TO authenticated;
GRANT ALL ON FUNCTION cpa.idempotency_check_v1(p_tenant_id uuid, p_key text, p_body_hash text) TO service_role;

-- FUNCTION cpa.job_attach_v1(uuid, jsonb)
CREATE FUNCTION cpa.job_attach_v1(p_job_id uuid, p_todos jsonb) RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    AS $$
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
-- COMMENT on FUNCTION cpa.job_attach_v1(p_job_id uuid, p_todos jsonb)
COMMENT ON FUNCTION cpa.job_attach_v1(p_job_id uuid, p_todos jsonb) IS 'Attach a planned sub-graph of ToDos to a pending or running job. Takes the job''s gate exclusively first.';
-- ACL on FUNCTION cpa.job_attach_v1(p_job_id uuid, p_todos jsonb)
REVOKE ALL ON FUNCTION cpa.job_attach_v1(p_job_id uuid, p_todos jsonb) FROM PUBLIC;
GRANT ALL ON FUNCTION cpa.job_attach_v1(p_job_id uuid, p_todos jsonb) TO service_role;

-- TABLE public.jobs
CREATE TABLE public.jobs (
    id uuid DEFAULT private.uuid_v7_v1() NOT NULL,
    tenant_id uuid NOT NULL,
    created_by uuid,
    request text,
    intent text,
    status text DEFAULT 'pending'::text NOT NULL,
    priority integer DEFAULT 0 NOT NULL,
    idempotency_key text,
    todo_count integer DEFAULT 0 NOT NULL,
    todos_done integer DEFAULT 0 NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    started_at timestamp with time zone,
    completed_at timestamp with time zone,
    error text,
    retry_count integer DEFAULT 0 NOT NULL,
    max_retries integer DEFAULT 3 NOT NULL,
    run_at timestamp with time zone,
    time_zone text DEFAULT 'UTC'::text NOT NULL,
    schedule_id uuid,
    scheduled_for timestamp with time zone,
    traceparent text,
    CONSTRAINT jobs_idempotency_key_check CHECK ((length(idempotency_key) <= 200)),
    CONSTRAINT jobs_status_check CHECK ((status = ANY (ARRAY['pending'::text, 'running'::text, 'done'::text, 'failed'::text, 'cancelled'::text]))),
    CONSTRAINT jobs_time_zone_check CHECK (((length(time_zone) >= 1) AND (length(time_zone) <= 64))),
    CONSTRAINT jobs_traceparent_check CHECK ((traceparent ~ '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$'::text))
)
WITH (fillfactor='80', autovacuum_vacuum_scale_factor='0.02', autovacuum_analyze_scale_factor='0.02');
-- COMMENT on TABLE public.jobs
COMMENT ON TABLE public.jobs IS 'A user request turned into a graph of ToDos. Status: pending -> running -> done | failed | cancelled.';
-- COMMENT on COLUMN public.jobs.run_at
COMMENT ON COLUMN public.jobs.run_at IS 'Earliest start of every ToDo of the job (null: immediate).';
-- COMMENT on COLUMN public.jobs.time_zone
COMMENT ON COLUMN public.jobs.time_zone IS 'The IANA zone times in the request were read in.';
-- COMMENT on COLUMN public.jobs.schedule_id
COMMENT ON COLUMN public.jobs.schedule_id IS 'The schedule whose occurrence created this job (null: submitted directly).';
-- COMMENT on COLUMN public.jobs.scheduled_for
COMMENT ON COLUMN public.jobs.scheduled_for IS 'The occurrence of the schedule this job runs.';
-- COMMENT on COLUMN public.jobs.traceparent
COMMENT ON COLUMN public.jobs.traceparent IS 'W3C traceparent of the span that created the job (null: tracing was off). Dispatcher and agent spans are its children.';
-- CONSTRAINT public.jobs jobs_pkey
ALTER TABLE ONLY public.jobs
    ADD CONSTRAINT jobs_pkey PRIMARY KEY (id);
-- INDEX public.jobs_finished_idx
CREATE INDEX jobs_finished_idx ON public.jobs USING btree (completed_at) WHERE (status = ANY (ARRAY['done'::text, 'failed'::text, 'cancelled'::text]));
-- INDEX public.jobs_schedule_occurrence_idx
CREATE UNIQUE INDEX jobs_schedule_occurrence_idx ON public.jobs USING btree (schedule_id, scheduled_for) WHERE (schedule_id IS NOT NULL);
-- INDEX public.jobs_tenant_created_idx
CREATE INDEX jobs_tenant_created_idx ON public.jobs USING btree (tenant_id, created_at DESC, id DESC);
-- INDEX public.jobs_tenant_idempotency_key_idx
CREATE UNIQUE INDEX jobs_tenant_idempotency_key_idx ON public.jobs USING btree (tenant_id, idempotency_key) WHERE (idempotency_key IS NOT NULL);
-- ROW SECURITY public.jobs
ALTER TABLE public.jobs ENABLE ROW LEVEL SECURITY;
-- ACL on TABLE public.jobs
GRANT SELECT ON TABLE public.jobs TO authenticated;
GRANT SELECT,INSERT,DELETE,UPDATE ON TABLE public.jobs TO service_role;

-- FUNCTION cpa.job_create_v2(uuid, text, text, jsonb, text, integer, integer, timestamp with time zone, text)
CREATE FUNCTION cpa.job_create_v2(p_tenant_id uuid, p_request text, p_intent text, p_todos jsonb, p_idempotency_key text DEFAULT NULL::text, p_priority integer DEFAULT 0, p_max_retries integer DEFAULT 3, p_run_at timestamp with time zone DEFAULT NULL::timestamp with time zone, p_time_zone text DEFAULT 'UTC'::text) RETURNS public.jobs
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    AS $$
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
-- COMMENT on FUNCTION cpa.job_create_v2(p_tenant_id uuid, p_request text, p_intent text, p_todos jsonb, p_idempotency_key text, p_priority integer, p_max_retries integer, p_run_at timestamp with time zone, p_time_zone text)
COMMENT ON FUNCTION cpa.job_create_v2(p_tenant_id uuid, p_request text, p_intent text, p_todos jsonb, p_idempotency_key text, p_priority integer, p_max_retries integer, p_run_at timestamp with time zone, p_time_zone text) IS 'Create a job with its ToDo graph, an optional earliest start (job-wide and per ToDo) and per-ToDo agent timeouts; a repeated idempotency key answers the existing job.';
-- ACL on FUNCTION cpa.job_create_v2(p_tenant_id uuid, p_request text, p_intent text, p_todos jsonb, p_idempotency_key text, p_priority integer, p_max_retries integer, p_run_at timestamp with time zone, p_time_zone text)
REVOKE ALL ON FUNCTION cpa.job_create_v2(p_tenant_id uuid, p_request text, p_intent text, p_todos jsonb, p_idempotency_key text, p_priority integer, p_max_retries integer, p_run_at timestamp with time zone, p_time_zone text) FROM PUBLIC;
GRANT ALL ON FUNCTION cpa.job_create_v2(p_tenant_id uuid, p_request text, p_intent text, p_todos jsonb, p_idempotency_key text, p_priority integer, p_max_retries integer, p_run_at timestamp with time zone, p_time_zone text) TO authenticated;
GRANT ALL ON FUNCTION cpa.job_create_v2(p_tenant_id uuid, p_request text, p_intent text, p_todos jsonb, p_idempotency_key text, p_priority integer, p_max_retries integer, p_run_at timestamp with time zone, p_time_zone text) TO service_role;

-- FUNCTION cpa.job_route_v2(uuid, text)
CREATE FUNCTION cpa.job_route_v2(p_job_id uuid, p_agent_key text) RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    AS $$
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
-- COMMENT on FUNCTION cpa.job_route_v2(p_job_id uuid, p_agent_key text)
COMMENT ON FUNCTION cpa.job_route_v2(p_job_id uuid, p_agent_key text) IS 'Route a job''s unfinished desktop ToDos to one agent. Takes the job''s gate exclusively, then its row, then its ToDos by id.';
-- ACL on FUNCTION cpa.job_route_v2(p_job_id uuid, p_agent_key text)
REVOKE ALL ON FUNCTION cpa.job_route_v2(p_job_id uuid, p_agent_key text) FROM PUBLIC;
GRANT ALL ON FUNCTION cpa.job_route_v2(p_job_id uuid, p_agent_key text) TO authenticated;
GRANT ALL ON FUNCTION cpa.job_route_v2(p_job_id uuid, p_agent_key text) TO service_role;

-- FUNCTION cpa.job_submit_v3(uuid, text, text, jsonb, text, integer, integer, timestamp with time zone, text, text, integer, integer)
CREATE FUNCTION cpa.job_submit_v3(p_tenant_id uuid, p_request text, p_intent text, p_todos jsonb, p_idempotency_key text DEFAULT NULL::text, p_priority integer DEFAULT 0, p_max_retries integer DEFAULT 3, p_run_at timestamp with time zone DEFAULT NULL::timestamp with time zone, p_time_zone text DEFAULT 'UTC'::text, p_traceparent text DEFAULT NULL::text, p_rate_limit integer DEFAULT NULL::integer, p_rate_window integer DEFAULT 60) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    SET "TimeZone" TO 'UTC'
    AS $$
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
-- COMMENT on FUNCTION cpa.job_submit_v3(p_tenant_id uuid, p_request text, p_intent text, p_todos jsonb, p_idempotency_key text, p_priority integer, p_max_retries integer, p_run_at timestamp with time zone, p_time_zone text, p_traceparent text, p_rate_limit integer, p_rate_window integer)
COMMENT ON FUNCTION cpa.job_submit_v3(p_tenant_id uuid, p_request text, p_intent text, p_todos jsonb, p_idempotency_key text, p_priority integer, p_max_retries integer, p_run_at timestamp with time zone, p_time_zone text, p_traceparent text, p_rate_limit integer, p_rate_window integer) IS 'POST /v1/jobs in one call: the caller''s tenant, the job with its graph, run_at, zone and trace context, the Postgres rate limit (CP429), and the job as JSON naming created_by. A new job of up to 100 ToDos writes its events and their Realtime broadcast (tenant and owner''s user topic) itself instead of staging them for the commit-time flush; a keyed request goes through cpa.job_create_v2 and may answer an earlier job of the caller''s (another user''s key: 55000).';
-- ACL on FUNCTION cpa.job_submit_v3(p_tenant_id uuid, p_request text, p_intent text, p_todos jsonb, p_idempotency_key text, p_priority integer, p_max_retries integer, p_run_at timestamp with time zone, p_time_zone text, p_traceparent text, p_rate_limit integer, p_rate_window integer)
REVOKE ALL ON FUNCTION cpa.job_submit_v3(p_tenant_id uuid, p_request text, p_intent text, p_todos jsonb, p_idempotency_key text, p_priority integer, p_max_retries integer, p_run_at timestamp with time zone, p_time_zone text, p_traceparent text, p_rate_limit integer, p_rate_window integer) FROM PUBLIC;
GRANT ALL ON FUNCTION cpa.job_submit_v3(p_tenant_id uuid, p_request text, p_intent text, p_todos jsonb, p_idempotency_key text, p_priority integer, p_max_retries integer, p_run_at timestamp with time zone, p_time_zone text, p_traceparent text, p_rate_limit integer, p_rate_window integer) TO authenticated;
GRANT ALL ON FUNCTION cpa.job_submit_v3(p_tenant_id uuid, p_request text, p_intent text, p_todos jsonb, p_idempotency_key text, p_priority integer, p_max_retries integer, p_run_at timestamp with time zone, p_time_zone text, p_traceparent text, p_rate_limit integer, p_rate_window integer) TO service_role;

-- FUNCTION cpa.job_trace_v1(uuid, text)
CREATE FUNCTION cpa.job_trace_v1(p_job_id uuid, p_traceparent text) RETURNS boolean
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    AS $$
begin
  perform private.job_authorized_v1(p_job_id);
  update public.jobs j set traceparent = p_traceparent
   where j.id = p_job_id and j.traceparent is null;
  return found;
end;
$$;
-- COMMENT on FUNCTION cpa.job_trace_v1(p_job_id uuid, p_traceparent text)
COMMENT ON FUNCTION cpa.job_trace_v1(p_job_id uuid, p_traceparent text) IS 'Store the trace context of the request that created a job (first one wins); the caller must be a member of the job''s tenant.';
-- ACL on FUNCTION cpa.job_trace_v1(p_job_id uuid, p_traceparent text)
REVOKE ALL ON FUNCTION cpa.job_trace_v1(p_job_id uuid, p_traceparent text) FROM PUBLIC;
GRANT ALL ON FUNCTION cpa.job_trace_v1(p_job_id uuid, p_traceparent text) TO authenticated;
GRANT ALL ON FUNCTION cpa.job_trace_v1(p_job_id uuid, p_traceparent text) TO service_role;

-- FUNCTION private.job_authorized_v1(uuid)
CREATE FUNCTION private.job_authorized_v1(p_job_id uuid) RETURNS public.jobs
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path TO ''
    AS $$
declare
  v_job public.jobs;
begin
  select * into v_job from public.jobs j where j.id = p_job_id;
  if not found then
    raise exception 'not found' using errcode = 'P0002', hint = 'It does not exist or is not visible to you.';
  end if;
  perform private.tenant_authorize_v1(v_job.tenant_id);
  return v_job;
end;
$$;
-- ACL on FUNCTION private.job_authorized_v1(p_job_id uuid)
REVOKE ALL ON FUNCTION private.job_authorized_v1(p_job_id uuid) FROM PUBLIC;

-- FUNCTION private.job_submit_as_v1(text, uuid, text, text, jsonb, text, integer, integer, timestamp with time zone, text, text, integer, integer)
CREATE FUNCTION private.job_submit_as_v1(p_claims text, p_tenant_id uuid, p_request text, p_intent text, p_todos jsonb, p_idempotency_key text DEFAULT NULL::text, p_priority integer DEFAULT 0, p_max_retries integer DEFAULT 3, p_run_at timestamp with time zone DEFAULT NULL::timestamp with time zone, p_time_zone text DEFAULT 'UTC'::text, p_traceparent text DEFAULT NULL::text, p_rate_limit integer DEFAULT NULL::integer, p_rate_window integer DEFAULT 60) RETURNS text
    LANGUAGE plpgsql
    SET search_path TO ''
    AS $$
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
-- COMMENT on FUNCTION private.job_submit_as_v1(p_claims text, p_tenant_id uuid, p_request text, p_intent text, p_todos jsonb, p_idempotency_key text, p_priority integer, p_max_retries integer, p_run_at timestamp with time zone, p_time_zone text, p_traceparent text, p_rate_limit integer, p_rate_window integer)
COMMENT ON FUNCTION private.job_submit_as_v1(p_claims text, p_tenant_id uuid, p_request text, p_intent text, p_todos jsonb, p_idempotency_key text, p_priority integer, p_max_retries integer, p_run_at timestamp with time zone, p_time_zone text, p_traceparent text, p_rate_limit integer, p_rate_window integer) IS 'POST /v1/jobs in one statement for the API''s login role: set role authenticated and the verified claims for the transaction, then cpa.job_submit_v3 as that role. Owner only.';
-- ACL on FUNCTION private.job_submit_as_v1(p_claims text, p_tenant_id uuid, p_request text, p_intent text, p_todos jsonb, p_idempotency_key text, p_priority integer, p_max_retries integer, p_run_at timestamp with time zone, p_time_zone text, p_traceparent text, p_rate_limit integer, p_rate_window integer)
REVOKE ALL ON FUNCTION private.job_submit_as_v1(p_claims text, p_tenant_id uuid, p_request text, p_intent text, p_todos jsonb, p_idempotency_key text, p_priority integer, p_max_retries integer, p_run_at timestamp with time zone, p_time_zone text, p_traceparent text, p_rate_limit integer, p_rate_window integer) FROM PUBLIC;

-- FUNCTION private.jsonb_depth_v1(jsonb, integer)
CREATE FUNCTION private.jsonb_depth_v1(p_value jsonb, p_limit integer DEFAULT 64) RETURNS integer
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    SET search_path TO ''
    AS $$
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
-- ACL on FUNCTION private.jsonb_depth_v1(p_value jsonb, p_limit integer)
REVOKE ALL ON FUNCTION private.jsonb_depth_v1(p_value jsonb, p_limit integer) FROM PUBLIC;

-- FUNCTION private.params_violation_v1(jsonb, jsonb)
CREATE FUNCTION private.params_violation_v1(p_schema jsonb, p_params jsonb) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    SET search_path TO ''
    AS $_$
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
$_$;
-- ACL on FUNCTION private.params_violation_v1(p_schema jsonb, p_params jsonb)
REVOKE ALL ON FUNCTION private.params_violation_v1(p_schema jsonb, p_params jsonb) FROM PUBLIC;

-- FUNCTION private.todo_edges_check_insert_v2()
CREATE FUNCTION private.todo_edges_check_insert_v2() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    AS $$
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
-- COMMENT on FUNCTION private.todo_edges_check_insert_v2()
COMMENT ON FUNCTION private.todo_edges_check_insert_v2() IS 'Dependencies inserted by one statement: same job, and no cycle (no search when every edge points to an earlier ToDo).';
-- ACL on FUNCTION private.todo_edges_check_insert_v2()
REVOKE ALL ON FUNCTION private.todo_edges_check_insert_v2() FROM PUBLIC;

-- FUNCTION private.todos_check_insert_v2()
CREATE FUNCTION private.todos_check_insert_v2() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    AS $_$
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
$_$;
-- COMMENT on FUNCTION private.todos_check_insert_v2()
COMMENT ON FUNCTION private.todos_check_insert_v2() IS 'The ToDo invariants of 20261127000510 for the ToDos one statement inserted, with the params bounds inline.';
-- ACL on FUNCTION private.todos_check_insert_v2()
REVOKE ALL ON FUNCTION private.todos_check_insert_v2() FROM PUBLIC;

-- FUNCTION private.todos_insert_v1(uuid, uuid, integer, integer, jsonb)
CREATE FUNCTION private.todos_insert_v1(p_job_id uuid, p_tenant_id uuid, p_priority integer, p_base integer, p_todos jsonb) RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    AS $$
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
-- ACL on FUNCTION private.todos_insert_v1(p_job_id uuid, p_tenant_id uuid, p_priority integer, p_base integer, p_todos jsonb)
REVOKE ALL ON FUNCTION private.todos_insert_v1(p_job_id uuid, p_tenant_id uuid, p_priority integer, p_base integer, p_todos jsonb) FROM PUBLIC;

-- TABLE private.catalogue_actions
CREATE TABLE private.catalogue_actions (
    name text NOT NULL,
    target text NOT NULL,
    requires_confirmation boolean DEFAULT false NOT NULL,
    params_schema jsonb DEFAULT '{"type": "object"}'::jsonb NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT catalogue_actions_name_check CHECK (((length(name) >= 1) AND (length(name) <= 64))),
    CONSTRAINT catalogue_actions_target_check CHECK ((target = ANY (ARRAY['cloud'::text, 'desktop'::text])))
);
-- COMMENT on TABLE private.catalogue_actions
COMMENT ON TABLE private.catalogue_actions IS 'The action catalogue (actions.yaml) as the database enforces it on every ToDo insert.';
-- CONSTRAINT private.catalogue_actions catalogue_actions_pkey
ALTER TABLE ONLY private.catalogue_actions
    ADD CONSTRAINT catalogue_actions_pkey PRIMARY KEY (name);
-- ROW SECURITY private.catalogue_actions
ALTER TABLE private.catalogue_actions ENABLE ROW LEVEL SECURITY;
-- ACL on TABLE private.catalogue_actions
GRANT SELECT ON TABLE private.catalogue_actions TO service_role;

-- TABLE private.job_idempotency
CREATE TABLE private.job_idempotency (
    tenant_id uuid NOT NULL,
    key text NOT NULL,
    body_hash text NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT job_idempotency_body_hash_check CHECK (((length(body_hash) >= 1) AND (length(body_hash) <= 128))),
    CONSTRAINT job_idempotency_key_check CHECK (((length(key) >= 1) AND (length(key) <= 200)))
);
-- COMMENT on TABLE private.job_idempotency
COMMENT ON TABLE private.job_idempotency IS 'Hash of the body first sent with each Idempotency-Key, per tenant.';
-- CONSTRAINT private.job_idempotency job_idempotency_pkey
ALTER TABLE ONLY private.job_idempotency
    ADD CONSTRAINT job_idempotency_pkey PRIMARY KEY (tenant_id, key);
-- INDEX private.job_idempotency_created_idx
CREATE INDEX job_idempotency_created_idx ON private.job_idempotency USING btree (created_at);
-- ROW SECURITY private.job_idempotency
ALTER TABLE private.job_idempotency ENABLE ROW LEVEL SECURITY;

-- TABLE public.todo_edges
CREATE TABLE public.todo_edges (
    todo_id uuid NOT NULL,
    depends_on_id uuid NOT NULL,
    tenant_id uuid NOT NULL,
    CONSTRAINT todo_edges_check CHECK ((todo_id <> depends_on_id))
);
-- COMMENT on TABLE public.todo_edges
COMMENT ON TABLE public.todo_edges IS 'Dependencies: todo_id runs after depends_on_id is done.';
-- CONSTRAINT public.todo_edges todo_edges_pkey
ALTER TABLE ONLY public.todo_edges
    ADD CONSTRAINT todo_edges_pkey PRIMARY KEY (todo_id, depends_on_id);
-- INDEX public.todo_edges_depends_on_idx
CREATE INDEX todo_edges_depends_on_idx ON public.todo_edges USING btree (depends_on_id);
-- ROW SECURITY public.todo_edges
ALTER TABLE public.todo_edges ENABLE ROW LEVEL SECURITY;
-- ACL on TABLE public.todo_edges
GRANT SELECT ON TABLE public.todo_edges TO authenticated;
GRANT SELECT,INSERT,DELETE,UPDATE ON TABLE public.todo_edges TO service_role;

-- CHECK CONSTRAINT public.jobs jobs_intent_length
ALTER TABLE public.jobs
    ADD CONSTRAINT jobs_intent_length CHECK ((length(intent) <= 200)) NOT VALID;

-- CHECK CONSTRAINT public.jobs jobs_max_retries_bounds
ALTER TABLE public.jobs
    ADD CONSTRAINT jobs_max_retries_bounds CHECK (((max_retries >= 0) AND (max_retries <= 25))) NOT VALID;

-- CHECK CONSTRAINT public.jobs jobs_priority_bounds
ALTER TABLE public.jobs
    ADD CONSTRAINT jobs_priority_bounds CHECK (((priority >= '-1000'::integer) AND (priority <= 1000))) NOT VALID;

-- CHECK CONSTRAINT public.jobs jobs_request_length
ALTER TABLE public.jobs
    ADD CONSTRAINT jobs_request_length CHECK ((length(request) <= 20000)) NOT VALID;

-- CHECK CONSTRAINT public.todos todos_assigned_agent_length
ALTER TABLE public.todos
    ADD CONSTRAINT todos_assigned_agent_length CHECK ((length(assigned_agent) <= 200)) NOT VALID;

-- CHECK CONSTRAINT public.todos todos_priority_bounds
ALTER TABLE public.todos
    ADD CONSTRAINT todos_priority_bounds CHECK (((priority >= '-1000'::integer) AND (priority <= 1000))) NOT VALID;

-- TRIGGER public.todo_edges todo_edges_check_insert
CREATE TRIGGER todo_edges_check_insert AFTER INSERT ON public.todo_edges REFERENCING NEW TABLE AS new_edges FOR EACH STATEMENT EXECUTE FUNCTION private.todo_edges_check_insert_v2();

-- TRIGGER public.todos todos_check_insert
CREATE TRIGGER todos_check_insert AFTER INSERT ON public.todos REFERENCING NEW TABLE AS new_todos FOR EACH STATEMENT EXECUTE FUNCTION private.todos_check_insert_v2();

-- FK CONSTRAINT private.job_idempotency job_idempotency_tenant_id_fkey
ALTER TABLE ONLY private.job_idempotency
    ADD CONSTRAINT job_idempotency_tenant_id_fkey FOREIGN KEY (tenant_id) REFERENCES public.tenants(id) ON DELETE CASCADE;

-- FK CONSTRAINT public.jobs jobs_tenant_id_fkey
ALTER TABLE ONLY public.jobs
    ADD CONSTRAINT jobs_tenant_id_fkey FOREIGN KEY (tenant_id) REFERENCES public.tenants(id) ON DELETE CASCADE;

-- FK CONSTRAINT public.todo_edges todo_edges_depends_on_id_fkey
ALTER TABLE ONLY public.todo_edges
    ADD CONSTRAINT todo_edges_depends_on_id_fkey FOREIGN KEY (depends_on_id) REFERENCES public.todos(id) ON DELETE CASCADE;

-- FK CONSTRAINT public.todo_edges todo_edges_todo_id_fkey
ALTER TABLE ONLY public.todo_edges
    ADD CONSTRAINT todo_edges_todo_id_fkey FOREIGN KEY (todo_id) REFERENCES public.todos(id) ON DELETE CASCADE;

-- FK CONSTRAINT public.todos todos_job_id_fkey
ALTER TABLE ONLY public.todos
    ADD CONSTRAINT todos_job_id_fkey FOREIGN KEY (job_id) REFERENCES public.jobs(id) ON DELETE CASCADE;

-- POLICY public.todo_edges Dependencies are visible to members of their tenant
CREATE POLICY "Dependencies are visible to members of their tenant" ON public.todo_edges FOR SELECT TO authenticated USING ((tenant_id IN ( SELECT private.user_tenant_ids_v1() AS user_tenant_ids_v1)));

-- POLICY public.jobs Jobs are visible to their creator and the tenant's admins
CREATE POLICY "Jobs are visible to their creator and the tenant's admins" ON public.jobs FOR SELECT TO authenticated USING (((tenant_id IN ( SELECT private.user_admin_tenant_ids_v1() AS user_admin_tenant_ids_v1)) OR ((created_by = ( SELECT auth.uid() AS uid)) AND (tenant_id IN ( SELECT private.user_tenant_ids_v1() AS user_tenant_ids_v1)))));

-- POLICY public.todos ToDos are visible with their job
CREATE POLICY "ToDos are visible with their job" ON public.todos FOR SELECT TO authenticated USING (((tenant_id IN ( SELECT private.user_admin_tenant_ids_v1() AS user_admin_tenant_ids_v1)) OR (EXISTS ( SELECT 1
   FROM public.jobs j
  WHERE ((j.id = todos.job_id) AND (j.created_by = ( SELECT auth.uid() AS uid)) AND (j.tenant_id IN ( SELECT private.user_tenant_ids_v1() AS user_tenant_ids_v1)))))));
