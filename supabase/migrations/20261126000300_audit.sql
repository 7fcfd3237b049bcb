-- Audit log: who changed what, before and after. Append-only for every role; written only by
-- triggers. Operators read it in the Supabase dashboard (Table Editor: public.audit_log).

create table public.audit_log (
  id bigserial primary key,
  tenant_id uuid,
  actor_id uuid,
  actor_role text,
  action text not null check (action in ('INSERT', 'UPDATE', 'DELETE')),
  entity text not null,
  entity_id text,
  before jsonb,
  after jsonb,
  created_at timestamptz not null default now()
);
comment on table public.audit_log is 'Append-only audit trail of jobs, tenants, memberships and agents. Nobody may update or delete it.';
create index audit_log_tenant_created_idx on public.audit_log (tenant_id, created_at desc);

-- The writer: a security definer trigger, so no API role needs insert on audit_log.
create function private.audit_write_v1()
returns trigger
language plpgsql security definer set search_path = ''
as $$
declare
  v_row jsonb := to_jsonb(coalesce(new, old));
begin
  insert into public.audit_log (tenant_id, actor_id, actor_role, action, entity, entity_id, before, after)
  values (
    coalesce((v_row ->> 'tenant_id')::uuid, case when tg_table_name = 'tenants' then (v_row ->> 'id')::uuid end),
    (select auth.uid()),
    coalesce((select auth.role()), nullif(current_setting('role', true), 'none'), session_user),
    tg_op,
    tg_table_name,
    coalesce(v_row ->> 'id', concat_ws(':', v_row ->> 'tenant_id', v_row ->> 'user_id')),
    case when tg_op in ('UPDATE', 'DELETE') then to_jsonb(old) end,
    case when tg_op in ('INSERT', 'UPDATE') then to_jsonb(new) end
  );
  return null;
end;
$$;
revoke execute on function private.audit_write_v1() from public;

create function private.audit_forbid_change_v1()
returns trigger
language plpgsql set search_path = ''
as $$
begin
  raise exception 'audit_log is append-only; % is not allowed', tg_op using errcode = '42501';
end;
$$;
revoke execute on function private.audit_forbid_change_v1() from public;

create trigger audit_log_append_only
  before update or delete on public.audit_log
  for each row execute function private.audit_forbid_change_v1();
create trigger audit_log_no_truncate
  before truncate on public.audit_log
  for each statement execute function private.audit_forbid_change_v1();

-- Jobs are audited on creation and on every status change, not on counter updates.
create trigger jobs_audit
  after insert or delete on public.jobs
  for each row execute function private.audit_write_v1();
create trigger jobs_audit_status
  after update of status on public.jobs
  for each row when (old.status is distinct from new.status)
  execute function private.audit_write_v1();
create trigger tenants_audit
  after insert or update or delete on public.tenants
  for each row execute function private.audit_write_v1();
create trigger memberships_audit
  after insert or update or delete on public.memberships
  for each row execute function private.audit_write_v1();
create trigger agents_audit
  after insert or delete or update of actions, name on public.agents
  for each row execute function private.audit_write_v1();

-- grants ---------------------------------------------------------------------------------------
revoke all on public.audit_log from anon, authenticated, service_role;
grant select on public.audit_log to authenticated, service_role;

-- row level security ---------------------------------------------------------------------------
alter table public.audit_log enable row level security;

-- policies -------------------------------------------------------------------------------------
create policy "Audit entries are visible to members of their tenant"
  on public.audit_log for select to authenticated
  using (tenant_id in (select private.user_tenant_ids_v1()));
