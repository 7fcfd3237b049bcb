-- Tenancy: tenants, memberships, and the membership lookup every policy uses.
-- The lookup is a security definer function in the non-exposed schema `private`, so policies
-- do not recurse into memberships' own RLS, and it is wrapped as `(select ...)` in policies so
-- Postgres evaluates it once per statement.

create schema if not exists private;
comment on schema private is 'Helpers for policies and SQL functions; not exposed through the Data API.';
revoke all on schema private from public;
grant usage on schema private to authenticated, service_role;

-- tenants --------------------------------------------------------------------------------------
create table public.tenants (
  id uuid primary key default gen_random_uuid(),
  name text not null check (length(name) between 1 and 200),
  created_at timestamptz not null default now()
);
comment on table public.tenants is 'A customer organisation. Every job, ToDo, event and audit row belongs to one.';

-- memberships ----------------------------------------------------------------------------------
create table public.memberships (
  tenant_id uuid not null references public.tenants (id) on delete cascade,
  user_id uuid not null references auth.users (id) on delete cascade,
  role text not null default 'member' check (role in ('owner', 'admin', 'member')),
  created_at timestamptz not null default now(),
  primary key (tenant_id, user_id)
);
comment on table public.memberships is 'Which users belong to which tenant. Authoritative for RLS (JWT claims are not fresh).';
create index memberships_user_id_idx on public.memberships (user_id);

-- helpers --------------------------------------------------------------------------------------
create function private.user_tenant_ids_v1()
returns setof uuid
language sql stable security definer set search_path = ''
as $$
  select m.tenant_id from public.memberships m where m.user_id = (select auth.uid())
$$;
comment on function private.user_tenant_ids_v1() is 'Tenant ids of the calling user (auth.uid()); used by every policy.';

-- True when the caller acts as an end user (SET ROLE authenticated, as PostgREST and the API
-- do); false for the service role and for privileged login roles such as the dispatcher's.
create function private.caller_is_user_v1()
returns boolean
language sql stable set search_path = ''
as $$
  select current_setting('role', true) in ('authenticated', 'anon')
$$;

-- Raise unless the caller may act for the tenant: members for end users, anyone privileged
-- enough to execute the calling function otherwise.
create function private.tenant_authorize_v1(p_tenant_id uuid)
returns void
language plpgsql stable security definer set search_path = ''
as $$
begin
  if private.caller_is_user_v1()
     and not exists (
       select 1 from public.memberships m
       where m.tenant_id = p_tenant_id and m.user_id = (select auth.uid())
     ) then
    raise exception 'not found' using errcode = 'P0002', hint = 'The tenant is not visible to this user.';
  end if;
end;
$$;

revoke execute on function private.user_tenant_ids_v1() from public;
revoke execute on function private.caller_is_user_v1() from public;
revoke execute on function private.tenant_authorize_v1(uuid) from public;
grant execute on function private.user_tenant_ids_v1() to authenticated, service_role;
grant execute on function private.caller_is_user_v1() to authenticated, service_role;
grant execute on function private.tenant_authorize_v1(uuid) to authenticated, service_role;

-- grants ---------------------------------------------------------------------------------------
revoke all on public.tenants, public.memberships from anon, authenticated;
grant select on public.tenants, public.memberships to authenticated;
grant select, insert, update, delete on public.tenants, public.memberships to service_role;

-- row level security ---------------------------------------------------------------------------
alter table public.tenants enable row level security;
alter table public.memberships enable row level security;

-- policies -------------------------------------------------------------------------------------
create policy "Tenants are visible to their members"
  on public.tenants for select to authenticated
  using (id in (select private.user_tenant_ids_v1()));

create policy "Memberships are visible to members of the same tenant"
  on public.memberships for select to authenticated
  using (tenant_id in (select private.user_tenant_ids_v1()));
