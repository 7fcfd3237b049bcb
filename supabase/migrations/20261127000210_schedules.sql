-- Recurring schedules: a cron expression in a time zone and a request or graph. The dispatcher
-- materialises each due occurrence into exactly one job that carries schedule_id: the schedule
-- row is claimed FOR UPDATE SKIP LOCKED and (schedule_id, scheduled_for) is unique on jobs.
-- End users read their tenant's schedules; every change goes through the functions below.

-- schedules ------------------------------------------------------------------------------------
create table public.schedules (
  id uuid primary key default gen_random_uuid(),
  tenant_id uuid not null references public.tenants (id) on delete cascade,
  created_by uuid,
  cron text not null check (length(cron) between 9 and 200),
  time_zone text not null default 'UTC' check (length(time_zone) between 1 and 64),
  request text check (length(request) between 1 and 4000),
  graph jsonb,
  intent text,
  todos jsonb not null check (jsonb_typeof(todos) = 'array' and jsonb_array_length(todos) > 0),
  paused boolean not null default false,
  next_run_at timestamptz not null,
  last_run_at timestamptz,
  last_job_id uuid,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  check ((request is null) <> (graph is null))
);
comment on table public.schedules is 'A recurring job: cron (5 fields, wall-clock in time_zone) and a request or graph, planned once into todos. next_run_at is the next occurrence to materialise.';
comment on column public.schedules.todos is 'The planned ToDos each occurrence''s job is created with.';
create index schedules_due_idx on public.schedules (next_run_at) where not paused;
create index schedules_tenant_created_idx on public.schedules (tenant_id, created_at desc, id desc);

alter table public.jobs
  add column schedule_id uuid references public.schedules (id) on delete set null,
  add column scheduled_for timestamptz;
comment on column public.jobs.schedule_id is 'The schedule whose occurrence created this job (null: submitted directly).';
comment on column public.jobs.scheduled_for is 'The occurrence of the schedule this job runs.';
create unique index jobs_schedule_occurrence_idx on public.jobs (schedule_id, scheduled_for)
  where schedule_id is not null;

-- audit: creation, deletion, and changes of what or when it runs --------------------------------
create trigger schedules_audit
  after insert or delete or update of cron, time_zone, paused, request, graph on public.schedules
  for each row execute function private.audit_write_v1();

-- create ---------------------------------------------------------------------------------------
create function cpa.schedule_create_v1(
  p_tenant_id uuid, p_cron text, p_time_zone text, p_request text, p_graph jsonb,
  p_intent text, p_todos jsonb, p_next_run_at timestamptz
) returns public.schedules
language plpgsql security definer set search_path = ''
as $$
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
comment on function cpa.schedule_create_v1 is 'Create a recurring schedule for a tenant the caller belongs to.';

-- a visible schedule (internal) ----------------------------------------------------------------
create function private.schedule_authorized_v1(p_schedule_id uuid)
returns public.schedules
language plpgsql security definer set search_path = ''
as $$
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
revoke execute on function private.schedule_authorized_v1(uuid) from public;
grant execute on function private.schedule_authorized_v1(uuid) to authenticated, service_role;

-- pause and resume -----------------------------------------------------------------------------
-- Resuming takes the next occurrence from the caller (computed from now): occurrences that fell
-- into the pause are skipped, not caught up.
create function cpa.schedule_pause_v1(p_schedule_id uuid, p_paused boolean,
                                      p_next_run_at timestamptz default null)
returns public.schedules
language plpgsql security definer set search_path = ''
as $$
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
comment on function cpa.schedule_pause_v1 is 'Pause or resume a schedule; resuming restarts from the given next occurrence.';

-- delete ---------------------------------------------------------------------------------------
create function cpa.schedule_delete_v1(p_schedule_id uuid)
returns boolean
language plpgsql security definer set search_path = ''
as $$
begin
  perform private.schedule_authorized_v1(p_schedule_id);
  delete from public.schedules s where s.id = p_schedule_id;
  return true;
end;
$$;
comment on function cpa.schedule_delete_v1 is 'Delete a schedule; the jobs it created stay (their schedule_id becomes null).';

-- materialise one occurrence (dispatcher) ------------------------------------------------------
-- Creates the occurrence's job unless it exists, and moves the schedule on to p_next_run_at.
-- Runs as the service role inside the transaction that holds the schedule row locked.
create function cpa.schedule_fire_v1(p_schedule_id uuid, p_occurrence timestamptz,
                                     p_next_run_at timestamptz)
returns public.jobs
language plpgsql security definer set search_path = ''
as $$
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
comment on function cpa.schedule_fire_v1 is 'Materialise one occurrence of a schedule into exactly one job and advance the schedule.';

-- grants ---------------------------------------------------------------------------------------
revoke all on public.schedules from anon, authenticated;
grant select on public.schedules to authenticated;
grant select, insert, update, delete on public.schedules to service_role;
revoke execute on function cpa.schedule_create_v1(uuid, text, text, text, jsonb, text, jsonb, timestamptz) from public, anon;
revoke execute on function cpa.schedule_pause_v1(uuid, boolean, timestamptz) from public, anon;
revoke execute on function cpa.schedule_delete_v1(uuid) from public, anon;
revoke execute on function cpa.schedule_fire_v1(uuid, timestamptz, timestamptz) from public, anon, authenticated;
grant execute on function cpa.schedule_create_v1(uuid, text, text, text, jsonb, text, jsonb, timestamptz) to authenticated, service_role;
grant execute on function cpa.schedule_pause_v1(uuid, boolean, timestamptz) to authenticated, service_role;
grant execute on function cpa.schedule_delete_v1(uuid) to authenticated, service_role;
grant execute on function cpa.schedule_fire_v1(uuid, timestamptz, timestamptz) to service_role;

-- row level security ---------------------------------------------------------------------------
alter table public.schedules enable row level security;

-- policies -------------------------------------------------------------------------------------
create policy "Schedules are visible to members of their tenant"
  on public.schedules for select to authenticated
  using (tenant_id in (select private.user_tenant_ids_v1()));
