-- POST /v1/jobs in one SQL call (issue 15).
-- The route used to make six round trips in its transaction: the claims, the caller's tenants,
-- the create, the trace context, the ToDo read-back and the rate-limit count. This function
-- does the tenant choice, the create (cpa.job_create_v2, unchanged: run_at, time zone and the
-- idempotency key behave as before), the trace context, the Postgres rate limit and the
-- read-back in the request's transaction, and answers the job in the API's JSON shape.
--
-- p_tenant_id null: the caller's oldest membership (as the API's tenant choice). A member of no
-- tenant, or of another tenant than asked: P0002, as before (404).
-- p_rate_limit null: no count here (Upstash counts outside the database). Past the limit the
-- function raises SQLSTATE CP429 with the seconds to wait in DETAIL, so the job rolls back with
-- the count, as when the count ran last in the transaction.
-- The counter row is updated last, so it is locked only from here to the commit.
-- Timestamps in the answer are RFC 3339 in UTC (the function runs with TimeZone UTC).

create function cpa.job_submit_v1(
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
  end if;

  v_job := cpa.job_create_v2(v_tenant, p_request, p_intent, p_todos, p_idempotency_key,
                             p_priority, p_max_retries, p_run_at, p_time_zone);
  if p_traceparent is not null and v_job.traceparent is null then
    -- First trace wins (as cpa.job_trace_v1): a repeated key keeps the original trace.
    update public.jobs j set traceparent = p_traceparent
     where j.id = v_job.id and j.traceparent is null
    returning * into v_job;
  end if;

  if p_rate_limit is not null then
    -- The fixed window of public.rate_limit_hit_v1, inlined: one call, and no dependency on a
    -- function name that may move between schemas.
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
    'todos', coalesce((
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
        from public.todos t where t.job_id = v_job.id), '[]'::jsonb));
end;
$$;
comment on function cpa.job_submit_v1 is 'POST /v1/jobs in one call: choose the caller''s tenant, create the job (cpa.job_create_v2), keep its trace context, count the Postgres rate limit (CP429 past it) and answer the job with its ToDos as JSON.';
revoke execute on function cpa.job_submit_v1(uuid, text, text, jsonb, text, integer, integer, timestamptz, text, text, integer, integer) from public, anon;
grant execute on function cpa.job_submit_v1(uuid, text, text, jsonb, text, integer, integer, timestamptz, text, text, integer, integer) to authenticated, service_role;
