-- Audit: who changed what
--
-- `audit_log` is written only by triggers (who, what, which entity, before and
-- after); an update, delete or truncate of it raises for every role, except the
-- retention prune's own delete (`cpa.audit_prune`, set inside
-- `cpa.retention_prune_v1`), which is itself audited.
--
-- Generated from supabase/migrations by scripts/schemas.py; edit a migration (and
-- the header in that script), then run `python scripts/schemas.py write`.

set check_function_bodies = false;

-- FUNCTION private.audit_forbid_change_v1()
CREATE FUNCTION private.audit_forbid_change_v1() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path TO ''
    AS $$
begin
  if tg_op = 'DELETE' and current_setting('cpa.audit_prune', true) = 'on' then
    return old;
  end if;
  raise exception 'audit_log is append-only; % is not allowed', tg_op using errcode = '42501';
end;
$$;
-- ACL on FUNCTION private.audit_forbid_change_v1()
REVOKE ALL ON FUNCTION private.audit_forbid_change_v1() FROM PUBLIC;

-- FUNCTION private.audit_write_v1()
CREATE FUNCTION private.audit_write_v1() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    AS $$
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
-- ACL on FUNCTION private.audit_write_v1()
REVOKE ALL ON FUNCTION private.audit_write_v1() FROM PUBLIC;

-- FUNCTION private.todo_agent_audit_v1()
CREATE FUNCTION private.todo_agent_audit_v1() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    AS $$
declare
  v_key text := substr(coalesce(new.lease_owner, old.lease_owner), 7);
begin
  insert into public.audit_log (tenant_id, actor_id, actor_role, action, entity, entity_id, before, after)
  values (
    new.tenant_id,
    (select auth.uid()),
    coalesce((select auth.role()), nullif(current_setting('role', true), 'none'), session_user),
    'UPDATE', 'todos', new.id::text,
    jsonb_build_object('status', old.status),
    jsonb_build_object(
      'status', new.status, 'job_id', new.job_id, 'action', new.action, 'attempts', new.attempts,
      'agent', v_key,
      'agent_user', (select a.created_by from public.agents a
                      where a.tenant_id = new.tenant_id and a.agent_key = v_key)));
  return null;
end;
$$;
-- COMMENT on FUNCTION private.todo_agent_audit_v1()
COMMENT ON FUNCTION private.todo_agent_audit_v1() IS 'Audit a desktop ToDo''s status change under an agent lease: the agent key and the user whose desktop it is.';
-- ACL on FUNCTION private.todo_agent_audit_v1()
REVOKE ALL ON FUNCTION private.todo_agent_audit_v1() FROM PUBLIC;

-- TABLE public.audit_log
CREATE TABLE public.audit_log (
    id bigint NOT NULL,
    tenant_id uuid,
    actor_id uuid,
    actor_role text,
    action text NOT NULL,
    entity text NOT NULL,
    entity_id text,
    before jsonb,
    after jsonb,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT audit_log_action_check CHECK ((action = ANY (ARRAY['INSERT'::text, 'UPDATE'::text, 'DELETE'::text])))
)
PARTITION BY RANGE (created_at);
-- COMMENT on TABLE public.audit_log
COMMENT ON TABLE public.audit_log IS 'Append-only audit trail of jobs, tenants, memberships and agents. Nobody may update or delete it.';
-- SEQUENCE public.audit_log_id_seq
CREATE SEQUENCE public.audit_log_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;
-- SEQUENCE OWNED BY public.audit_log_id_seq
ALTER SEQUENCE public.audit_log_id_seq OWNED BY public.audit_log.id;
-- DEFAULT public.audit_log id
ALTER TABLE ONLY public.audit_log ALTER COLUMN id SET DEFAULT nextval('public.audit_log_id_seq'::regclass);
-- CONSTRAINT public.audit_log audit_log_pkey
ALTER TABLE ONLY public.audit_log
    ADD CONSTRAINT audit_log_pkey PRIMARY KEY (id, created_at);
-- INDEX public.audit_log_tenant_created_idx
CREATE INDEX audit_log_tenant_created_idx ON ONLY public.audit_log USING btree (tenant_id, created_at DESC);
-- ROW SECURITY public.audit_log
ALTER TABLE public.audit_log ENABLE ROW LEVEL SECURITY;
-- ACL on TABLE public.audit_log
GRANT SELECT ON TABLE public.audit_log TO authenticated;
GRANT SELECT ON TABLE public.audit_log TO service_role;

-- TABLE private.audit_log_default
CREATE TABLE private.audit_log_default (
    id bigint DEFAULT nextval('public.audit_log_id_seq'::regclass) CONSTRAINT audit_log_id_not_null NOT NULL,
    tenant_id uuid,
    actor_id uuid,
    actor_role text,
    action text CONSTRAINT audit_log_action_not_null NOT NULL,
    entity text CONSTRAINT audit_log_entity_not_null NOT NULL,
    entity_id text,
    before jsonb,
    after jsonb,
    created_at timestamp with time zone DEFAULT now() CONSTRAINT audit_log_created_at_not_null NOT NULL,
    CONSTRAINT audit_log_action_check CHECK ((action = ANY (ARRAY['INSERT'::text, 'UPDATE'::text, 'DELETE'::text])))
);
-- COMMENT on TABLE private.audit_log_default
COMMENT ON TABLE private.audit_log_default IS 'audit_log rows no dated partition covers; moved out when their partition is created.';
-- CONSTRAINT private.audit_log_default audit_log_default_pkey
ALTER TABLE ONLY private.audit_log_default
    ADD CONSTRAINT audit_log_default_pkey PRIMARY KEY (id, created_at);
-- INDEX private.audit_log_default_tenant_id_created_at_idx
CREATE INDEX audit_log_default_tenant_id_created_at_idx ON private.audit_log_default USING btree (tenant_id, created_at DESC);
-- ROW SECURITY private.audit_log_default
ALTER TABLE private.audit_log_default ENABLE ROW LEVEL SECURITY;

-- TABLE private.audit_log_legacy
CREATE TABLE private.audit_log_legacy (
    id bigint DEFAULT nextval('public.audit_log_id_seq'::regclass) CONSTRAINT audit_log_id_not_null NOT NULL,
    tenant_id uuid,
    actor_id uuid,
    actor_role text,
    action text CONSTRAINT audit_log_action_not_null NOT NULL,
    entity text CONSTRAINT audit_log_entity_not_null NOT NULL,
    entity_id text,
    before jsonb,
    after jsonb,
    created_at timestamp with time zone DEFAULT now() CONSTRAINT audit_log_created_at_not_null NOT NULL,
    CONSTRAINT audit_log_action_check CHECK ((action = ANY (ARRAY['INSERT'::text, 'UPDATE'::text, 'DELETE'::text])))
);
-- COMMENT on TABLE private.audit_log_legacy
COMMENT ON TABLE private.audit_log_legacy IS 'audit_log rows written before partitioning (20261207004100); dropped by retention once all are older than the retention.';
-- CONSTRAINT private.audit_log_legacy audit_log_legacy_pkey
ALTER TABLE ONLY private.audit_log_legacy
    ADD CONSTRAINT audit_log_legacy_pkey PRIMARY KEY (id, created_at);
-- INDEX private.audit_log_created_idx
CREATE INDEX audit_log_created_idx ON private.audit_log_legacy USING btree (created_at);
-- INDEX private.audit_log_tenant_created_idx
CREATE INDEX audit_log_tenant_created_idx ON private.audit_log_legacy USING btree (tenant_id, created_at DESC);
-- ROW SECURITY private.audit_log_legacy
ALTER TABLE private.audit_log_legacy ENABLE ROW LEVEL SECURITY;

-- TABLE ATTACH private.audit_log_default
ALTER TABLE ONLY public.audit_log ATTACH PARTITION private.audit_log_default DEFAULT;

-- TABLE ATTACH private.audit_log_legacy
ALTER TABLE ONLY public.audit_log ATTACH PARTITION private.audit_log_legacy FOR VALUES FROM (MINVALUE) TO ('2027-01-01 00:00:00+00');

-- INDEX ATTACH private.audit_log_default_pkey
ALTER INDEX public.audit_log_pkey ATTACH PARTITION private.audit_log_default_pkey;

-- INDEX ATTACH private.audit_log_default_tenant_id_created_at_idx
ALTER INDEX public.audit_log_tenant_created_idx ATTACH PARTITION private.audit_log_default_tenant_id_created_at_idx;

-- INDEX ATTACH private.audit_log_legacy_pkey
ALTER INDEX public.audit_log_pkey ATTACH PARTITION private.audit_log_legacy_pkey;

-- INDEX ATTACH private.audit_log_tenant_created_idx
ALTER INDEX public.audit_log_tenant_created_idx ATTACH PARTITION private.audit_log_tenant_created_idx;

-- TRIGGER private.audit_log_default audit_log_no_truncate
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON private.audit_log_default FOR EACH STATEMENT EXECUTE FUNCTION private.audit_forbid_change_v1();

-- TRIGGER private.audit_log_legacy audit_log_no_truncate
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON private.audit_log_legacy FOR EACH STATEMENT EXECUTE FUNCTION private.audit_forbid_change_v1();

-- TRIGGER public.agents agents_audit
CREATE TRIGGER agents_audit AFTER INSERT OR DELETE OR UPDATE OF actions, name ON public.agents FOR EACH ROW EXECUTE FUNCTION private.audit_write_v1();

-- TRIGGER public.audit_log audit_log_append_only
CREATE TRIGGER audit_log_append_only BEFORE DELETE OR UPDATE ON public.audit_log FOR EACH ROW EXECUTE FUNCTION private.audit_forbid_change_v1();

-- TRIGGER public.audit_log audit_log_no_truncate
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON public.audit_log FOR EACH STATEMENT EXECUTE FUNCTION private.audit_forbid_change_v1();

-- TRIGGER public.jobs jobs_audit
CREATE TRIGGER jobs_audit AFTER INSERT OR DELETE ON public.jobs FOR EACH ROW EXECUTE FUNCTION private.audit_write_v1();

-- TRIGGER public.jobs jobs_audit_status
CREATE TRIGGER jobs_audit_status AFTER UPDATE OF status ON public.jobs FOR EACH ROW WHEN ((old.status IS DISTINCT FROM new.status)) EXECUTE FUNCTION private.audit_write_v1();

-- TRIGGER public.memberships memberships_audit
CREATE TRIGGER memberships_audit AFTER INSERT OR DELETE OR UPDATE ON public.memberships FOR EACH ROW EXECUTE FUNCTION private.audit_write_v1();

-- TRIGGER public.schedules schedules_audit
CREATE TRIGGER schedules_audit AFTER INSERT OR DELETE OR UPDATE OF cron, time_zone, paused, request, graph ON public.schedules FOR EACH ROW EXECUTE FUNCTION private.audit_write_v1();

-- TRIGGER public.tenants tenants_audit
CREATE TRIGGER tenants_audit AFTER INSERT OR DELETE OR UPDATE ON public.tenants FOR EACH ROW EXECUTE FUNCTION private.audit_write_v1();

-- TRIGGER public.todos todos_agent_audit
CREATE TRIGGER todos_agent_audit AFTER UPDATE OF status ON public.todos FOR EACH ROW WHEN (((new.target = 'desktop'::text) AND (old.status IS DISTINCT FROM new.status) AND ((new.lease_owner ~~ 'agent:%'::text) OR (old.lease_owner ~~ 'agent:%'::text)))) EXECUTE FUNCTION private.todo_agent_audit_v1();

-- POLICY public.audit_log Audit entries are visible to the actor and the tenant's admins
CREATE POLICY "Audit entries are visible to the actor and the tenant's admins" ON public.audit_log FOR SELECT TO authenticated USING (((tenant_id IN ( SELECT private.user_admin_tenant_ids_v1() AS user_admin_tenant_ids_v1)) OR ((actor_id = ( SELECT auth.uid() AS uid)) AND (tenant_id IN ( SELECT private.user_tenant_ids_v1() AS user_tenant_ids_v1)))));
