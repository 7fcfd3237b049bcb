-- Planner: attach a planned sub-graph to a running job, and a per-tenant plan cache.

-- attach ---------------------------------------------------------------------------------------
-- Called by the dispatcher in the same transaction that completes the job's `plan` ToDo, so
-- the planned ToDos appear exactly once and the job cannot finish in between.
create function public.job_attach_v1(p_job_id uuid, p_todos jsonb)
returns integer
language plpgsql security definer set search_path = ''
as $$
declare
  v_job public.jobs;
  v_count integer := jsonb_array_length(p_todos);
  v_base integer;
begin
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
comment on function public.job_attach_v1 is 'Attach a planned sub-graph of ToDos to a pending or running job.';

-- plan cache -----------------------------------------------------------------------------------
create table private.plan_cache (
  tenant_id uuid not null,
  key text not null,
  plan jsonb not null,
  created_at timestamptz not null default now(),
  expires_at timestamptz not null,
  primary key (tenant_id, key)
);
comment on table private.plan_cache is 'Validated plans per tenant, keyed by normalised request and catalogue version.';

create function public.plan_cache_get_v1(p_tenant_id uuid, p_key text)
returns jsonb
language sql stable security definer set search_path = ''
as $$
  select c.plan from private.plan_cache c
   where c.tenant_id = p_tenant_id and c.key = p_key and c.expires_at > now()
$$;

create function public.plan_cache_put_v1(p_tenant_id uuid, p_key text, p_plan jsonb, p_ttl_seconds integer)
returns void
language sql security definer set search_path = ''
as $$
  insert into private.plan_cache (tenant_id, key, plan, expires_at)
  values (p_tenant_id, p_key, p_plan, now() + make_interval(secs => p_ttl_seconds))
  on conflict (tenant_id, key) do update
     set plan = excluded.plan, created_at = now(), expires_at = excluded.expires_at
$$;

-- grants ---------------------------------------------------------------------------------------
revoke all on private.plan_cache from public, anon, authenticated;
revoke execute on function public.job_attach_v1(uuid, jsonb),
  public.plan_cache_get_v1(uuid, text), public.plan_cache_put_v1(uuid, text, jsonb, integer)
  from public, anon, authenticated;
grant execute on function public.job_attach_v1(uuid, jsonb),
  public.plan_cache_get_v1(uuid, text), public.plan_cache_put_v1(uuid, text, jsonb, integer)
  to service_role;

-- row level security ---------------------------------------------------------------------------
alter table private.plan_cache enable row level security;
-- No policies: only the security definer functions above touch the table.
