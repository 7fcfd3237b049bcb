-- Quotas on schedules (issue 22): one tenant made 1,000 every-minute schedules with a 50-ToDo
-- graph, 50,000 ToDos a minute, where POST /v1/jobs allows 60 jobs a minute.
--
-- 1. A cap on a tenant's active (unpaused) schedules: creating or resuming one past it is
--    refused (SQLSTATE 55000, the API's 409) with a message that names the limit. The cap comes
--    from the caller (CPA_SCHEDULE_CAP); counting and inserting run under a per-tenant advisory
--    lock so concurrent creations cannot pass it together.
-- 2. A budget of scheduled jobs per tenant and minute of occurrence (CPA_SCHEDULE_JOBS_PER_MINUTE),
--    counted in private.rate_limits under the key 'schedule_jobs:<tenant>'. An occurrence past it
--    is skipped, not queued: it still gets its one job per occurrence, with no ToDos, created and
--    cancelled at once with an error that names the budget, so the skip is a job.status event
--    (SSE, Realtime), an audit_log entry (jobs are audited on insert and status change) and a
--    row in GET /v1/jobs. The schedule counts its skips (skipped_runs, last_skipped_at).
--    The window is the occurrence's minute, not now(): a catch-up occurrence counts in the
--    minute it was due, and a test can drive the clock.
--    A skipped occurrence's job is the schedule creator's, as a fired one is (created_by).
--
-- The v1 functions stay for the contract migration to drop; API roles lose execute on the
-- create and pause ones, which would skip the cap.

-- columns --------------------------------------------------------------------------------------
alter table public.schedules
  add column skipped_runs integer not null default 0,
  add column last_skipped_at timestamptz;
comment on column public.schedules.skipped_runs is 'Occurrences skipped because the tenant''s scheduled-jobs budget per minute was spent.';
comment on column public.schedules.last_skipped_at is 'The last skipped occurrence.';

-- create ---------------------------------------------------------------------------------------
create function cpa.schedule_create_v2(
  p_tenant_id uuid, p_cron text, p_time_zone text, p_request text, p_graph jsonb,
  p_intent text, p_todos jsonb, p_next_run_at timestamptz, p_cap integer
) returns public.schedules
language plpgsql security definer set search_path = ''
as $$
declare
  v_row public.schedules;
  v_active integer;
begin
  perform private.tenant_authorize_v1(p_tenant_id);
  if p_cap is null or p_cap < 1 then
    raise exception 'The schedule cap must be a positive number.' using errcode = '22023';
  end if;
  -- Serialise a tenant's creations and resumes: count and insert as one step.
  perform pg_advisory_xact_lock(7263300, hashtext(p_tenant_id::text));
  select count(*) into v_active
    from public.schedules s where s.tenant_id = p_tenant_id and not s.paused;
  if v_active >= p_cap then
    raise exception 'The tenant has % active schedules, its limit (CPA_SCHEDULE_CAP = %); pause or delete one before creating another.', v_active, p_cap
      using errcode = '55000';
  end if;
  if (select count(*) from public.schedules s where s.tenant_id = p_tenant_id) >= 1000 then
    raise exception 'The tenant already has 1000 schedules (paused ones included); delete some first.'
      using errcode = '55000';
  end if;
  insert into public.schedules (tenant_id, created_by, cron, time_zone, request, graph, intent,
                                todos, next_run_at)
  values (p_tenant_id, (select auth.uid()), p_cron, p_time_zone, p_request, p_graph, p_intent,
          p_todos, p_next_run_at)
  returning * into v_row;
  return v_row;
end;
$$;
comment on function cpa.schedule_create_v2 is 'Create a recurring schedule for a tenant the caller belongs to, unless the tenant already has p_cap active schedules (55000).';
revoke execute on function cpa.schedule_create_v2(uuid, text, text, text, jsonb, text, jsonb, timestamptz, integer) from public, anon;
grant execute on function cpa.schedule_create_v2(uuid, text, text, text, jsonb, text, jsonb, timestamptz, integer) to authenticated, service_role;

-- pause and resume -----------------------------------------------------------------------------
create function cpa.schedule_pause_v2(p_schedule_id uuid, p_paused boolean,
                                      p_next_run_at timestamptz, p_cap integer)
returns public.schedules
language plpgsql security definer set search_path = ''
as $$
declare
  v_row public.schedules;
  v_active integer;
begin
  v_row := private.schedule_authorized_v1(p_schedule_id);
  if v_row.paused = p_paused then
    return v_row;
  end if;
  if not p_paused then
    perform pg_advisory_xact_lock(7263300, hashtext(v_row.tenant_id::text));
    select count(*) into v_active
      from public.schedules s where s.tenant_id = v_row.tenant_id and not s.paused;
    if v_active >= coalesce(p_cap, 0) then
      raise exception 'The tenant has % active schedules, its limit (CPA_SCHEDULE_CAP = %); pause or delete one before resuming another.', v_active, p_cap
        using errcode = '55000';
    end if;
  end if;
  update public.schedules s
     set paused = p_paused,
         next_run_at = case when not p_paused and p_next_run_at is not null then p_next_run_at
                            else s.next_run_at end,
         updated_at = now()
   where s.id = p_schedule_id
  returning * into v_row;
  return v_row;
end;
$$;
comment on function cpa.schedule_pause_v2 is 'Pause or resume a schedule; resuming restarts from the given next occurrence and respects the cap of active schedules (55000).';
revoke execute on function cpa.schedule_pause_v2(uuid, boolean, timestamptz, integer) from public, anon;
grant execute on function cpa.schedule_pause_v2(uuid, boolean, timestamptz, integer) to authenticated, service_role;

-- materialise one occurrence (dispatcher) ------------------------------------------------------
create function cpa.schedule_fire_v2(p_schedule_id uuid, p_occurrence timestamptz,
                                     p_next_run_at timestamptz, p_budget integer)
returns public.jobs
language plpgsql security definer set search_path = ''
as $$
declare
  v_row public.schedules;
  v_job public.jobs;
  v_window timestamptz := date_trunc('minute', p_occurrence);
  v_hits integer;
begin
  select * into v_row from public.schedules s where s.id = p_schedule_id for no key update;
  if not found then
    raise exception 'not found' using errcode = 'P0002', hint = 'No such schedule.';
  end if;
  select * into v_job from public.jobs j
   where j.schedule_id = p_schedule_id and j.scheduled_for = p_occurrence;
  if not found then
    insert into private.rate_limits as r (key, window_start, hits)
    values ('schedule_jobs:' || v_row.tenant_id::text, v_window, 1)
    on conflict (key, window_start) do update set hits = r.hits + 1
    returning r.hits into v_hits;
    if random() < 0.01 then
      delete from private.rate_limits r
       where r.key like 'schedule_jobs:%' and r.window_start < now() - interval '1 hour';
    end if;
    if p_budget is not null and v_hits > p_budget then
      -- Skipped: the occurrence's job exists (so it is not retried) but holds no ToDos.
      insert into public.jobs (tenant_id, created_by, request, intent, time_zone, schedule_id,
                               scheduled_for)
      values (v_row.tenant_id, v_row.created_by, v_row.request, v_row.intent, v_row.time_zone,
              p_schedule_id, p_occurrence)
      returning * into v_job;
      update public.jobs j
         set status = 'cancelled', completed_at = now(),
             error = format('Skipped: the tenant''s scheduled jobs for the minute %s UTC passed '
                            'its budget (CPA_SCHEDULE_JOBS_PER_MINUTE = %s); this occurrence '
                            'was not queued.',
                            to_char(v_window at time zone 'UTC', 'YYYY-MM-DD HH24:MI'), p_budget)
       where j.id = v_job.id
      returning * into v_job;
      update public.schedules s
         set skipped_runs = s.skipped_runs + 1, last_skipped_at = p_occurrence
       where s.id = p_schedule_id;
    else
      v_job := cpa.job_create_v2(v_row.tenant_id, v_row.request, v_row.intent, v_row.todos,
                                 null, 0, 3, null, v_row.time_zone);
      update public.jobs j
         set schedule_id = p_schedule_id, scheduled_for = p_occurrence,
             created_by = v_row.created_by
       where j.id = v_job.id
      returning * into v_job;
    end if;
  end if;
  update public.schedules s
     set next_run_at = greatest(s.next_run_at, p_next_run_at), last_run_at = p_occurrence,
         last_job_id = v_job.id, updated_at = now()
   where s.id = p_schedule_id;
  return v_job;
end;
$$;
comment on function cpa.schedule_fire_v2 is 'Materialise one occurrence of a schedule into exactly one job (the creator''s) and advance the schedule; past the tenant''s budget of scheduled jobs per minute the job is created cancelled, without ToDos.';
revoke execute on function cpa.schedule_fire_v2(uuid, timestamptz, timestamptz, integer) from public, anon, authenticated;
grant execute on function cpa.schedule_fire_v2(uuid, timestamptz, timestamptz, integer) to service_role;

-- the v1 create and pause skip the cap: API roles lose them ------------------------------------
revoke execute on function cpa.schedule_create_v1(uuid, text, text, text, jsonb, text, jsonb, timestamptz) from authenticated;
revoke execute on function cpa.schedule_pause_v1(uuid, boolean, timestamptz) from authenticated;
