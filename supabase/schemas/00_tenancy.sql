-- Tenancy: tenants, memberships and the membership checks every policy uses
--
-- Every tenant-owned row carries tenant_id; RLS is enabled on every table and each
-- policy is `to authenticated`, reading `private.user_tenant_ids_v1()` once per
-- statement. Schemas `cpa` (operations) and `private` (helpers) are not exposed to the
-- Data API; their functions are `security definer` with `search_path = ''` and check
-- membership inside (`private.tenant_authorize_v1`, the `*_authorized_v1` helpers).
--
-- Generated from supabase/migrations by scripts/schemas.py; edit a migration (and
-- the header in that script), then run `python scripts/schemas.py write`.

set check_function_bodies = false;

-- SCHEMA cpa
CREATE SCHEMA cpa;
-- COMMENT on SCHEMA cpa
COMMENT ON SCHEMA cpa IS 'Operations (versioned SQL functions); not exposed through the Data API.';
-- ACL on SCHEMA cpa
GRANT USAGE ON SCHEMA cpa TO authenticated;
GRANT USAGE ON SCHEMA cpa TO service_role;

-- SCHEMA private
CREATE SCHEMA private;
-- COMMENT on SCHEMA private
COMMENT ON SCHEMA private IS 'Helpers for policies and SQL functions; not exposed through the Data API.';
-- ACL on SCHEMA private
GRANT USAGE ON SCHEMA private TO authenticated;
GRANT USAGE ON SCHEMA private TO service_role;

-- FUNCTION private.caller_is_user_v1()
CREATE FUNCTION private.caller_is_user_v1() RETURNS boolean
    LANGUAGE sql STABLE
    SET search_path TO ''
    AS $$
  select current_setting('role', true) in ('authenticated', 'anon')
$$;
-- ACL on FUNCTION private.caller_is_user_v1()
REVOKE ALL ON FUNCTION private.caller_is_user_v1() FROM PUBLIC;
GRANT ALL ON FUNCTION private.caller_is_user_v1() TO authenticated;
GRANT ALL ON FUNCTION private.caller_is_user_v1() TO service_role;

-- FUNCTION private.job_visible_v1(uuid)
CREATE FUNCTION private.job_visible_v1(p_job_id uuid) RETURNS boolean
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path TO ''
    AS $$
  select not private.caller_is_user_v1()
      or exists (select 1 from public.jobs j
                  where j.id = p_job_id
                    and ((j.created_by = (select auth.uid())
                          and j.tenant_id in (select private.user_tenant_ids_v1()))
                         or j.tenant_id in (select private.user_admin_tenant_ids_v1())))
$$;
-- COMMENT on FUNCTION private.job_visible_v1(p_job_id uuid)
COMMENT ON FUNCTION private.job_visible_v1(p_job_id uuid) IS 'The caller may read the job: its creator, an owner or admin of its tenant, or a privileged role.';
-- ACL on FUNCTION private.job_visible_v1(p_job_id uuid)
REVOKE ALL ON FUNCTION private.job_visible_v1(p_job_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION private.job_visible_v1(p_job_id uuid) TO authenticated;
GRANT ALL ON FUNCTION private.job_visible_v1(p_job_id uuid) TO service_role;

-- FUNCTION private.tenant_authorize_v1(uuid)
CREATE FUNCTION private.tenant_authorize_v1(p_tenant_id uuid) RETURNS void
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path TO ''
    AS $$
begin
  if private.caller_is_user_v1()
     and not exists (
       select 1 from public.memberships m
       where m.tenant_id = p_tenant_id and m.user_id = (select auth.uid())
     ) then
    raise exception 'not found' using errcode = 'P0002', hint = 'It does not exist or is not visible to you.';
  end if;
end;
$$;
-- ACL on FUNCTION private.tenant_authorize_v1(p_tenant_id uuid)
REVOKE ALL ON FUNCTION private.tenant_authorize_v1(p_tenant_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION private.tenant_authorize_v1(p_tenant_id uuid) TO authenticated;
GRANT ALL ON FUNCTION private.tenant_authorize_v1(p_tenant_id uuid) TO service_role;

-- FUNCTION private.user_admin_tenant_ids_v1()
CREATE FUNCTION private.user_admin_tenant_ids_v1() RETURNS SETOF uuid
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path TO ''
    AS $$
  select m.tenant_id from public.memberships m
   where m.user_id = (select auth.uid()) and m.role in ('owner', 'admin')
$$;
-- COMMENT on FUNCTION private.user_admin_tenant_ids_v1()
COMMENT ON FUNCTION private.user_admin_tenant_ids_v1() IS 'Tenant ids where the calling user (auth.uid()) is an owner or admin: they see all of the tenant''s jobs.';
-- ACL on FUNCTION private.user_admin_tenant_ids_v1()
REVOKE ALL ON FUNCTION private.user_admin_tenant_ids_v1() FROM PUBLIC;
GRANT ALL ON FUNCTION private.user_admin_tenant_ids_v1() TO authenticated;
GRANT ALL ON FUNCTION private.user_admin_tenant_ids_v1() TO service_role;

-- FUNCTION private.user_tenant_ids_v1()
CREATE FUNCTION private.user_tenant_ids_v1() RETURNS SETOF uuid
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path TO ''
    AS $$
  select m.tenant_id from public.memberships m where m.user_id = (select auth.uid())
$$;
-- COMMENT on FUNCTION private.user_tenant_ids_v1()
COMMENT ON FUNCTION private.user_tenant_ids_v1() IS 'Tenant ids of the calling user (auth.uid()); used by every policy.';
-- ACL on FUNCTION private.user_tenant_ids_v1()
REVOKE ALL ON FUNCTION private.user_tenant_ids_v1() FROM PUBLIC;
GRANT ALL ON FUNCTION private.user_tenant_ids_v1() TO authenticated;
GRANT ALL ON FUNCTION private.user_tenant_ids_v1() TO service_role;

-- TABLE public.memberships
CREATE TABLE public.memberships (
    tenant_id uuid NOT NULL,
    user_id uuid NOT NULL,
    role text DEFAULT 'member'::text NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT memberships_role_check CHECK ((role = ANY (ARRAY['owner'::text, 'admin'::text, 'member'::text])))
);
-- COMMENT on TABLE public.memberships
COMMENT ON TABLE public.memberships IS 'Which users belong to which tenant. Authoritative for RLS (JWT claims are not fresh).';
-- CONSTRAINT public.memberships memberships_pkey
ALTER TABLE ONLY public.memberships
    ADD CONSTRAINT memberships_pkey PRIMARY KEY (tenant_id, user_id);
-- INDEX public.memberships_user_id_idx
CREATE INDEX memberships_user_id_idx ON public.memberships USING btree (user_id);
-- ROW SECURITY public.memberships
ALTER TABLE public.memberships ENABLE ROW LEVEL SECURITY;
-- ACL on TABLE public.memberships
GRANT SELECT ON TABLE public.memberships TO authenticated;
GRANT SELECT,INSERT,DELETE,UPDATE ON TABLE public.memberships TO service_role;

-- TABLE public.tenants
CREATE TABLE public.tenants (
    id uuid DEFAULT gen_random_uuid() NOT NULL,
    name text NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT tenants_name_check CHECK (((length(name) >= 1) AND (length(name) <= 200)))
);
-- COMMENT on TABLE public.tenants
COMMENT ON TABLE public.tenants IS 'A customer organisation. Every job, ToDo, event and audit row belongs to one.';
-- CONSTRAINT public.tenants tenants_pkey
ALTER TABLE ONLY public.tenants
    ADD CONSTRAINT tenants_pkey PRIMARY KEY (id);
-- ROW SECURITY public.tenants
ALTER TABLE public.tenants ENABLE ROW LEVEL SECURITY;
-- ACL on TABLE public.tenants
GRANT SELECT ON TABLE public.tenants TO authenticated;
GRANT SELECT,INSERT,DELETE,UPDATE ON TABLE public.tenants TO service_role;

-- FK CONSTRAINT public.memberships memberships_tenant_id_fkey
ALTER TABLE ONLY public.memberships
    ADD CONSTRAINT memberships_tenant_id_fkey FOREIGN KEY (tenant_id) REFERENCES public.tenants(id) ON DELETE CASCADE;

-- FK CONSTRAINT public.memberships memberships_user_id_fkey
ALTER TABLE ONLY public.memberships
    ADD CONSTRAINT memberships_user_id_fkey FOREIGN KEY (user_id) REFERENCES auth.users(id) ON DELETE CASCADE;

-- POLICY public.memberships Memberships are visible to members of the same tenant
CREATE POLICY "Memberships are visible to members of the same tenant" ON public.memberships FOR SELECT TO authenticated USING ((tenant_id IN ( SELECT private.user_tenant_ids_v1() AS user_tenant_ids_v1)));

-- POLICY public.tenants Tenants are visible to their members
CREATE POLICY "Tenants are visible to their members" ON public.tenants FOR SELECT TO authenticated USING ((id IN ( SELECT private.user_tenant_ids_v1() AS user_tenant_ids_v1)));
