-- Jobs and their ToDo graphs, the progress log, and desktop agents.
-- End users only read these tables (RLS limits them to their tenants); every state change goes
-- through the versioned SQL functions of the operations migration.

-- jobs -----------------------------------------------------------------------------------------
create table public.jobs (
  id uuid primary key default gen_random_uuid(),
  tenant_id uuid not null references public.tenants (id) on delete cascade,
  created_by uuid,
  request text,
  intent text,
  status text not null default 'pending'
    check (status in ('pending', 'running', 'done', 'failed', 'cancelled')),
  priority integer not null default 0,
  idempotency_key text check (length(idempotency_key) <= 200),
  todo_count integer not null default 0,
  todos_done integer not null default 0,
  created_at timestamptz not null default now(),
  started_at timestamptz,
  completed_at timestamptz,
  error text,
  retry_count integer not null default 0,
  max_retries integer not null default 3
);
comment on table public.jobs is 'A user request turned into a graph of ToDos. Status: pending -> running -> done | failed | cancelled.';
create unique index jobs_tenant_idempotency_key_idx on public.jobs (tenant_id, idempotency_key)
  where idempotency_key is not null;
create index jobs_tenant_created_idx on public.jobs (tenant_id, created_at desc, id desc);

-- todos ----------------------------------------------------------------------------------------
create table public.todos (
  id uuid primary key default gen_random_uuid(),
  job_id uuid not null references public.jobs (id) on delete cascade,
  tenant_id uuid not null,
  key text not null,
  position integer not null default 0,
  action text not null,
  target text not null check (target in ('cloud', 'desktop')),
  params jsonb not null default '{}'::jsonb,
  status text not null default 'waiting'
    check (status in ('waiting', 'confirming', 'ready', 'running', 'done', 'failed', 'cancelled')),
  priority integer not null default 0,
  attempts integer not null default 0,
  max_attempts integer not null default 3 check (max_attempts between 1 and 25),
  requires_confirmation boolean not null default false,
  confirmed_at timestamptz,
  refusals integer not null default 0,
  assigned_agent text,
  run_after timestamptz not null default now(),
  timer_until timestamptz,
  lease_owner text,
  lease_expires_at timestamptz,
  result jsonb,
  error text,
  deps_remaining integer not null default 0 check (deps_remaining >= 0),
  created_at timestamptz not null default now(),
  started_at timestamptz,
  finished_at timestamptz,
  updated_at timestamptz not null default now(),
  unique (job_id, key)
);
comment on table public.todos is 'One unit of work. waiting (dependencies open) -> confirming (needs approval) -> ready -> running (leased) -> done | failed | cancelled.';
comment on column public.todos.assigned_agent is 'A desktop agent this ToDo was routed to; only that agent may claim it (null: any agent of the tenant).';
comment on column public.todos.deps_remaining is 'Unfinished dependencies; completion decrements it and the ToDo is ready at 0.';
-- The claim path: ready ToDos per target and tenant, in priority order.
create index todos_ready_idx on public.todos (target, tenant_id, priority desc, run_after)
  where status = 'ready';
-- The lease-expiry sweep.
create index todos_lease_idx on public.todos (lease_expires_at) where status = 'running';
create index todos_tenant_id_idx on public.todos (tenant_id);
-- Fewer dead tuples per page on this hot table (see pg-queues notes).
alter table public.todos set (fillfactor = 80, autovacuum_vacuum_scale_factor = 0.02);

-- todo_edges -----------------------------------------------------------------------------------
create table public.todo_edges (
  todo_id uuid not null references public.todos (id) on delete cascade,
  depends_on_id uuid not null references public.todos (id) on delete cascade,
  tenant_id uuid not null,
  primary key (todo_id, depends_on_id),
  check (todo_id <> depends_on_id)
);
comment on table public.todo_edges is 'Dependencies: todo_id runs after depends_on_id is done.';
create index todo_edges_depends_on_idx on public.todo_edges (depends_on_id);
create index todo_edges_tenant_id_idx on public.todo_edges (tenant_id);

-- job_events -----------------------------------------------------------------------------------
create table public.job_events (
  id bigserial primary key,
  tenant_id uuid not null,
  job_id uuid not null references public.jobs (id) on delete cascade,
  todo_id uuid,
  kind text not null,
  status text,
  data jsonb not null default '{}'::jsonb,
  created_at timestamptz not null default now()
);
comment on table public.job_events is 'Append-only progress log (job and ToDo status changes, output, notifications). Feeds SSE (Last-Event-ID = id) and Realtime.';
create index job_events_job_id_idx on public.job_events (job_id, id);
create index job_events_tenant_id_idx on public.job_events (tenant_id);

-- agents ---------------------------------------------------------------------------------------
create table public.agents (
  id uuid primary key default gen_random_uuid(),
  tenant_id uuid not null references public.tenants (id) on delete cascade,
  agent_key text not null check (length(agent_key) between 1 and 200),
  name text,
  actions text[] not null default '{}',
  created_by uuid,
  last_seen_at timestamptz not null default now(),
  created_at timestamptz not null default now(),
  unique (tenant_id, agent_key)
);
comment on table public.agents is 'Desktop agents of a tenant, the actions each offers, and when each was last seen.';

-- grants ---------------------------------------------------------------------------------------
revoke all on public.jobs, public.todos, public.todo_edges, public.job_events, public.agents
  from anon, authenticated;
grant select on public.jobs, public.todos, public.todo_edges, public.job_events, public.agents
  to authenticated;
grant select, insert, update, delete on public.jobs, public.todos, public.todo_edges, public.agents
  to service_role;
grant select, insert on public.job_events to service_role;
grant usage, select on sequence public.job_events_id_seq to service_role;

-- row level security ---------------------------------------------------------------------------
alter table public.jobs enable row level security;
alter table public.todos enable row level security;
alter table public.todo_edges enable row level security;
alter table public.job_events enable row level security;
alter table public.agents enable row level security;

-- policies -------------------------------------------------------------------------------------
create policy "Jobs are visible to members of their tenant"
  on public.jobs for select to authenticated
  using (tenant_id in (select private.user_tenant_ids_v1()));

create policy "ToDos are visible to members of their tenant"
  on public.todos for select to authenticated
  using (tenant_id in (select private.user_tenant_ids_v1()));

create policy "Dependencies are visible to members of their tenant"
  on public.todo_edges for select to authenticated
  using (tenant_id in (select private.user_tenant_ids_v1()));

create policy "Job events are visible to members of their tenant"
  on public.job_events for select to authenticated
  using (tenant_id in (select private.user_tenant_ids_v1()));

create policy "Agents are visible to members of their tenant"
  on public.agents for select to authenticated
  using (tenant_id in (select private.user_tenant_ids_v1()));
