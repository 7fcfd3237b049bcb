-- Schedules: recurring jobs
--
-- A schedule belongs to a tenant and fires at most one job per occurrence: jobs carry
-- (schedule_id, scheduled_for), unique together.
--
-- Generated from supabase/migrations by scripts/schemas.py; edit a migration (and
-- the header in that script), then run `python scripts/schemas.py write`.

set check_function_bodies = false;

-- TABLE public.schedules
CREATE TABLE public.schedules (
    id uuid DEFAULT gen_random_uuid() NOT NULL,
    tenant_id uuid NOT NULL,
    created_by uuid,
    cron text NOT NULL,
    time_zone text DEFAULT 'UTC'::text NOT NULL,
    request text,
    graph jsonb,
    intent text,
    todos jsonb NOT NULL,
    paused boolean DEFAULT false NOT NULL,
    next_run_at timestamp with time zone NOT NULL,
    last_run_at timestamp with time zone,
    last_job_id uuid,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    skipped_runs integer DEFAULT 0 NOT NULL,
    last_skipped_at timestamp with time zone,
    CONSTRAINT schedules_check CHECK (((request IS NULL) <> (graph IS NULL))),
    CONSTRAINT schedules_cron_check CHECK (((length(cron) >= 9) AND (length(cron) <= 200))),
    CONSTRAINT schedules_request_check CHECK (((length(request) >= 1) AND (length(request) <= 4000))),
    CONSTRAINT schedules_time_zone_check CHECK (((length(time_zone) >= 1) AND (length(time_zone) <= 64))),
    CONSTRAINT schedules_todos_check CHECK (((jsonb_typeof(todos) = 'array'::text) AND (jsonb_array_length(todos) > 0)))
);
-- COMMENT on TABLE public.schedules
COMMENT ON TABLE public.schedules IS 'A recurring job: cron (5 fields, wall-clock in time_zone) and a request or graph, planned once into todos. next_run_at is the next occurrence to materialise.';
-- COMMENT on COLUMN public.schedules.todos
COMMENT ON COLUMN public.schedules.todos IS 'The planned ToDos each occurrence''s job is created with.';
-- COMMENT on COLUMN public.schedules.skipped_runs
COMMENT ON COLUMN public.schedules.skipped_runs IS 'Occurrences skipped because the tenant''s scheduled-jobs budget per minute was spent.';
-- COMMENT on COLUMN public.schedules.last_skipped_at
COMMENT ON COLUMN public.schedules.last_skipped_at IS 'The last skipped occurrence.';
-- CONSTRAINT public.schedules schedules_pkey
ALTER TABLE ONLY public.schedules
    ADD CONSTRAINT schedules_pkey PRIMARY KEY (id);
-- INDEX public.schedules_due_idx
CREATE INDEX schedules_due_idx ON public.schedules USING btree (next_run_at) WHERE (NOT paused);
-- INDEX public.schedules_tenant_created_idx
CREATE INDEX schedules_tenant_created_idx ON public.schedules USING btree (tenant_id, created_at DESC, id DESC);
-- ROW SECURITY public.schedules
ALTER TABLE public.schedules ENABLE ROW LEVEL SECURITY;
-- ACL on TABLE public.schedules
GRANT SELECT ON TABLE public.schedules TO authenticated;
GRANT SELECT,INSERT,DELETE,UPDATE ON TABLE public.schedules TO service_role;

-- FUNCTION cpa.schedule_create_v1(uuid, text, text, text, jsonb, text, jsonb, timestamp with time zone)
CREATE FUNCTION cpa.schedule_create_v1(p_tenant_id uuid, p_cron text, p_time_zone text, p_request text, p_graph jsonb, p_intent text, p_todos jsonb, p_next_run_at timestamp with time zone) RETURNS public.schedules
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    AS $$
declare
  v_row public.schedules;
begin
  perform private.tenant_authorize_v1(p_tenant_id);
  if (select count(*) from public.schedules s where s.tenant_id = p_tenant_id) >= 1000 then
    raise exception 'The tenant already has 1000 schedules; delete some first.' using errcode = '22023';
  end if;
  insert into public.schedules (tenant_id, created_by, cron, time_zone, request, graph, intent,
                                todos, next_run_at)
  values (p_tenant_id, (select auth.uid()), p_cron, p_time_zone, p_request, p_graph, p_intent,
          p_todos, p_next_run_at)
  returning * into v_row;
  return v_row;
end;
$$;
-- COMMENT on FUNCTION cpa.schedule_create_v1(p_tenant_id uuid, p_cron text, p_time_zone text, p_request text, p_graph jsonb, p_intent text, p_todos jsonb, p_next_run_at timestamp with time zone)
COMMENT ON FUNCTION cpa.schedule_create_v1(p_tenant_id uuid, p_cron text, p_time_zone text, p_request text, p_graph jsonb, p_intent text, p_todos jsonb, p_next_run_at timestamp with time zone) IS 'Create a recurring schedule for a tenant the caller belongs to.';
-- ACL on FUNCTION cpa.schedule_create_v1(p_tenant_id uuid, p_cron text, p_time_zone text, p_request text, p_graph jsonb, p_intent text, p_todos jsonb, p_next_run_at timestamp with time zone)
REVOKE ALL ON FUNCTION cpa.schedule_create_v1(p_tenant_id uuid, p_cron text, p_time_zone text, p_request text, p_graph jsonb, p_intent text, p_todos jsonb, p_next_run_at timestamp with time zone) FROM PUBLIC;
GRANT ALL ON FUNCTION cpa.schedule_create_v1(p_tenant_id uuid, p_cron text, p_time_zone text, p_request text, p_graph jsonb, p_intent text, p_todos jsonb, p_next_run_at timestamp with time zone) TO service_role;

-- FUNCTION cpa.schedule_create_v2(uuid, text, text, text, jsonb, text, jsonb, timestamp with time zone, integer)
CREATE FUNCTION cpa.schedule_create_v2(p_tenant_id uuid, p_cron text, p_time_zone text, p_request text, p_graph jsonb, p_intent text, p_todos jsonb, p_next_run_at timestamp with time zone, p_cap integer) RETURNS public.schedules
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    AS $$
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
-- COMMENT on FUNCTION cpa.schedule_create_v2(p_tenant_id uuid, p_cron text, p_time_zone text, p_request text, p_graph jsonb, p_intent text, p_todos jsonb, p_next_run_at timestamp with time zone, p_cap integer)
COMMENT ON FUNCTION cpa.schedule_create_v2(p_tenant_id uuid, p_cron text, p_time_zone text, p_request text, p_graph jsonb, p_intent text, p_todos jsonb, p_next_run_at timestamp with time zone, p_cap integer) IS 'Create a recurring schedule for a tenant the caller belongs to, unless the tenant already has p_cap active schedules (55000).';
-- ACL on FUNCTION cpa.schedule_create_v2(p_tenant_id uuid, p_cron text, p_time_zone text, p_request text, p_graph jsonb, p_intent text, p_todos jsonb, p_next_run_at timestamp with time zone, p_cap integer)
REVOKE ALL ON FUNCTION cpa.schedule_create_v2(p_tenant_id uuid, p_cron text, p_time_zone text, p_request text, p_graph jsonb, p_intent text, p_todos jsonb, p_next_run_at timestamp with time zone, p_cap integer) FROM PUBLIC;
GRANT ALL ON FUNCTION cpa.schedule_create_v2(p_tenant_id uuid, p_cron text, p_time_zone text, p_request text, p_graph jsonb, p_intent text, p_todos jsonb, p_next_run_at timestamp with time zone, p_cap integer) TO authenticated;
GRANT ALL ON FUNCTION cpa.schedule_create_v2(p_tenant_id uuid, p_cron text, p_time_zone text, p_request text, p_graph jsonb, p_intent text, p_todos jsonb, p_next_run_at timestamp with time zone, p_cap integer) TO service_role;

-- FUNCTION cpa.schedule_delete_v1(uuid)
CREATE FUNCTION cpa.schedule_delete_v1(p_schedule_id uuid) RETURNS boolean
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    AS $$
begin
  perform private.schedule_authorized_v1(p_schedule_id);
  delete from public.schedules s where s.id = p_schedule_id;
  return true;
end;
$$;
-- COMMENT on FUNCTION cpa.schedule_delete_v1(p_schedule_id uuid)
COMMENT ON FUNCTION cpa.schedule_delete_v1(p_schedule_id uuid) IS 'Delete a schedule; the jobs it created stay (their schedule_id becomes null).';
-- ACL on FUNCTION cpa.schedule_delete_v1(p_schedule_id uuid)
REVOKE ALL ON FUNCTION cpa.schedule_delete_v1(p_schedule_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION cpa.schedule_delete_v1(p_schedule_id uuid) TO authenticated;
GRANT ALL ON FUNCTION cpa.schedule_delete_v1(p_schedule_id uuid) TO service_role;

-- FUNCTION cpa.schedule_fire_v1(uuid, timestamp with time zone, timestamp with time zone)
CREATE FUNCTION cpa.schedule_fire_v1(p_schedule_id uuid, p_occurrence timestamp with time zone, p_next_run_at timestamp with time zone) RETURNS public.jobs
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    AS $$
declare
  v_row public.schedules;
  v_job public.jobs;
begin
  select * into v_row from public.schedules s where s.id = p_schedule_id for no key update;
  if not found then
    raise exception 'not found' using errcode = 'P0002', hint = 'No such schedule.';
  end if;
  select * into v_job from public.jobs j
   where j.schedule_id = p_schedule_id and j.scheduled_for = p_occurrence;
  if not found then
    v_job := cpa.job_create_v2(v_row.tenant_id, v_row.request, v_row.intent, v_row.todos,
                               null, 0, 3, null, v_row.time_zone);
    update public.jobs j
       set schedule_id = p_schedule_id, scheduled_for = p_occurrence, created_by = v_row.created_by
     where j.id = v_job.id
    returning * into v_job;
  end if;
  update public.schedules s
     set next_run_at = greatest(s.next_run_at, p_next_run_at), last_run_at = p_occurrence,
         last_job_id = v_job.id, updated_at = now()
   where s.id = p_schedule_id;
  return v_job;
end;
$$;
-- COMMENT on FUNCTION cpa.schedule_fire_v1(p_schedule_id uuid, p_occurrence timestamp with time zone, p_next_run_at timestamp with time zone)
COMMENT ON FUNCTION cpa.schedule_fire_v1(p_schedule_id uuid, p_occurrence timestamp with time zone, p_next_run_at timestamp with time zone) IS 'Materialise one occurrence of a schedule into exactly one job and advance the schedule.';
-- ACL on FUNCTION cpa.schedule_fire_v1(p_schedule_id uuid, p_occurrence timestamp with time zone, p_next_run_at timestamp with time zone)
REVOKE ALL ON FUNCTION cpa.schedule_fire_v1(p_schedule_id uuid, p_occurrence timestamp with time zone, p_next_run_at timestamp with time zone) FROM PUBLIC;
GRANT ALL ON FUNCTION cpa.schedule_fire_v1(p_schedule_id uuid, p_occurrence timestamp with time zone, p_next_run_at timestamp with time zone) TO service_role;

-- FUNCTION cpa.schedule_fire_v2(uuid, timestamp with time zone, timestamp with time zone, integer)
CREATE FUNCTION cpa.schedule_fire_v2(p_schedule_id uuid, p_occurrence timestamp with time zone, p_next_run_at timestamp with time zone, p_budget integer) RETURNS public.jobs
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    AS $$
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
-- COMMENT on FUNCTION cpa.schedule_fire_v2(p_schedule_id uuid, p_occurrence timestamp with time zone, p_next_run_at timestamp with time zone, p_budget integer)
COMMENT ON FUNCTION cpa.schedule_fire_v2(p_schedule_id uuid, p_occurrence timestamp with time zone, p_next_run_at timestamp with time zone, p_budget integer) IS 'Materialise one occurrence of a schedule into exactly one job (the creator''s) and advance the schedule; past the tenant''s budget of scheduled jobs per minute the job is created cancelled, without ToDos.';
-- ACL on FUNCTION cpa.schedule_fire_v2(p_schedule_id uuid, p_occurrence timestamp with time zone, p_next_run_at timestamp with time zone, p_budget integer)
REVOKE ALL ON FUNCTION cpa.schedule_fire_v2(p_schedule_id uuid, p_occurrence timestamp with time zone, p_next_run_at timestamp with time zone, p_budget integer) FROM PUBLIC;
GRANT ALL ON FUNCTION cpa.schedule_fire_v2(p_schedule_id uuid, p_occurrence timestamp with time zone, p_next_run_at timestamp with time zone, p_budget integer) TO service_role;

-- FUNCTION cpa.schedule_pause_v1(uuid, boolean, timestamp with time zone)
CREATE FUNCTION cpa.schedule_pause_v1(p_schedule_id uuid, p_paused boolean, p_next_run_at timestamp with time zone DEFAULT NULL::timestamp with time zone) RETURNS public.schedules
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    AS $$
declare
  v_row public.schedules;
begin
  v_row := private.schedule_authorized_v1(p_schedule_id);
  if v_row.paused = p_paused then
    return v_row;
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
-- COMMENT on FUNCTION cpa.schedule_pause_v1(p_schedule_id uuid, p_paused boolean, p_next_run_at timestamp with time zone)
COMMENT ON FUNCTION cpa.schedule_pause_v1(p_schedule_id uuid, p_paused boolean, p_next_run_at timestamp with time zone) IS 'Pause or resume a schedule; resuming restarts from the given next occurrence.';
-- ACL on FUNCTION cpa.schedule_pause_v1(p_schedule_id uuid, p_paused boolean, p_next_run_at timestamp with time zone)
REVOKE ALL ON FUNCTION cpa.schedule_pause_v1(p_schedule_id uuid, p_paused boolean, p_next_run_at timestamp with time zone) FROM PUBLIC;
GRANT ALL ON FUNCTION cpa.schedule_pause_v1(p_schedule_id uuid, p_paused boolean, p_next_run_at timestamp with time zone) TO service_role;

-- FUNCTION cpa.schedule_pause_v2(uuid, boolean, timestamp with time zone, integer)
CREATE FUNCTION cpa.schedule_pause_v2(p_schedule_id uuid, p_paused boolean, p_next_run_at timestamp with time zone, p_cap integer) RETURNS public.schedules
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    AS $$
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
-- COMMENT on FUNCTION cpa.schedule_pause_v2(p_schedule_id uuid, p_paused boolean, p_next_run_at timestamp with time zone, p_cap integer)
COMMENT ON FUNCTION cpa.schedule_pause_v2(p_schedule_id uuid, p_paused boolean, p_next_run_at timestamp with time zone, p_cap integer) IS 'Pause or resume a schedule; resuming restarts from the given next occurrence and respects the cap of active schedules (55000).';
-- ACL on FUNCTION cpa.schedule_pause_v2(p_schedule_id uuid, p_paused boolean, p_next_run_at timestamp with time zone, p_cap integer)
REVOKE ALL ON FUNCTION cpa.schedule_pause_v2(p_schedule_id uuid, p_paused boolean, p_next_run_at timestamp with time zone, p_cap integer) FROM PUBLIC;
GRANT ALL ON FUNCTION cpa.schedule_pause_v2(p_schedule_id uuid, p_paused boolean, p_next_run_at timestamp with time zone, p_cap integer) TO authenticated;
GRANT ALL ON FUNCTION cpa.schedule_pause_v2(p_schedule_id uuid, p_paused boolean, p_next_run_at timestamp with time zone, p_cap integer) TO service_role;

-- FUNCTION private.schedule_authorized_v1(uuid)
CREATE FUNCTION private.schedule_authorized_v1(p_schedule_id uuid) RETURNS public.schedules
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    AS $$
declare
  v_row public.schedules;
begin
  select * into v_row from public.schedules s where s.id = p_schedule_id for no key update;
  if not found then
    raise exception 'not found' using errcode = 'P0002', hint = 'No such schedule.';
  end if;
  perform private.tenant_authorize_v1(v_row.tenant_id);
  return v_row;
end;
$$;
-- ACL on FUNCTION private.schedule_authorized_v1(p_schedule_id uuid)
REVOKE ALL ON FUNCTION private.schedule_authorized_v1(p_schedule_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION private.schedule_authorized_v1(p_schedule_id uuid) TO authenticated;
GRANT ALL ON FUNCTION private.schedule_authorized_v1(p_schedule_id uuid) TO service_role;

-- FK CONSTRAINT public.jobs jobs_schedule_id_fkey
ALTER TABLE ONLY public.jobs
    ADD CONSTRAINT jobs_schedule_id_fkey FOREIGN KEY (schedule_id) REFERENCES public.schedules(id) ON DELETE SET NULL;

-- FK CONSTRAINT public.schedules schedules_tenant_id_fkey
ALTER TABLE ONLY public.schedules
    ADD CONSTRAINT schedules_tenant_id_fkey FOREIGN KEY (tenant_id) REFERENCES public.tenants(id) ON DELETE CASCADE;

-- POLICY public.schedules Schedules are visible to their creator and the tenant's admins
CREATE POLICY "Schedules are visible to their creator and the tenant's admins" ON public.schedules FOR SELECT TO authenticated USING (((tenant_id IN ( SELECT private.user_admin_tenant_ids_v1() AS user_admin_tenant_ids_v1)) OR ((created_by = ( SELECT auth.uid() AS uid)) AND (tenant_id IN ( SELECT private.user_tenant_ids_v1() AS user_tenant_ids_v1)))));
