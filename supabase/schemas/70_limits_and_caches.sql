-- Limits and caches: rate limits and the planner's cache
--
-- A tenant's requests count in fixed windows (`private.rate_limits`, one row a key
-- and window); planner answers are cached per tenant until `expires_at`.
--
-- Generated from supabase/migrations by scripts/schemas.py; edit a migration (and
-- the header in that script), then run `python scripts/schemas.py write`.

set check_function_bodies = false;

-- FUNCTION cpa.plan_cache_get_v1(uuid, text)
CREATE FUNCTION cpa.plan_cache_get_v1(p_tenant_id uuid, p_key text) RETURNS jsonb
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path TO ''
    AS $$
  select c.plan from private.plan_cache c
   where c.tenant_id = p_tenant_id and c.key = p_key and c.expires_at > now()
$$;
-- ACL on FUNCTION cpa.plan_cache_get_v1(p_tenant_id uuid, p_key text)
REVOKE ALL ON FUNCTION cpa.plan_cache_get_v1(p_tenant_id uuid, p_key text) FROM PUBLIC;
GRANT ALL ON FUNCTION cpa.plan_cache_get_v1(p_tenant_id uuid, p_key text) TO service_role;

-- FUNCTION cpa.plan_cache_put_v1(uuid, text, jsonb, integer)
CREATE FUNCTION cpa.plan_cache_put_v1(p_tenant_id uuid, p_key text, p_plan jsonb, p_ttl_seconds integer) RETURNS void
    LANGUAGE sql SECURITY DEFINER
    SET search_path TO ''
    AS $$
  insert into private.plan_cache (tenant_id, key, plan, expires_at)
  values (p_tenant_id, p_key, p_plan, now() + make_interval(secs => p_ttl_seconds))
  on conflict (tenant_id, key) do update
     set plan = excluded.plan, created_at = now(), expires_at = excluded.expires_at
$$;
-- ACL on FUNCTION cpa.plan_cache_put_v1(p_tenant_id uuid, p_key text, p_plan jsonb, p_ttl_seconds integer)
REVOKE ALL ON FUNCTION cpa.plan_cache_put_v1(p_tenant_id uuid, p_key text, p_plan jsonb, p_ttl_seconds integer) FROM PUBLIC;
GRANT ALL ON FUNCTION cpa.plan_cache_put_v1(p_tenant_id uuid, p_key text, p_plan jsonb, p_ttl_seconds integer) TO service_role;

-- FUNCTION cpa.rate_limit_hit_v1(uuid, integer, integer)
CREATE FUNCTION cpa.rate_limit_hit_v1(p_tenant_id uuid, p_limit integer, p_window_seconds integer) RETURNS TABLE(allowed boolean, retry_after double precision)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    AS $$
declare
  v_key text := 'jobs:' || p_tenant_id::text;
  v_start timestamptz := to_timestamp(floor(extract(epoch from now()) / p_window_seconds) * p_window_seconds);
  v_hits integer;
begin
  perform private.tenant_authorize_v1(p_tenant_id);
  insert into private.rate_limits as r (key, window_start, hits)
  values (v_key, v_start, 1)
  on conflict (key, window_start) do update set hits = r.hits + 1
  returning r.hits into v_hits;
  if random() < 0.01 then
    delete from private.rate_limits r where r.window_start < now() - make_interval(secs => 2 * p_window_seconds);
  end if;
  allowed := v_hits <= p_limit;
  retry_after := case when allowed then 0
                      else extract(epoch from (v_start + make_interval(secs => p_window_seconds) - now())) end;
  return next;
end;
$$;
-- COMMENT on FUNCTION cpa.rate_limit_hit_v1(p_tenant_id uuid, p_limit integer, p_window_seconds integer)
COMMENT ON FUNCTION cpa.rate_limit_hit_v1(p_tenant_id uuid, p_limit integer, p_window_seconds integer) IS 'Count one request against a fixed window; allowed is false once the limit is passed.';
-- ACL on FUNCTION cpa.rate_limit_hit_v1(p_tenant_id uuid, p_limit integer, p_window_seconds integer)
REVOKE ALL ON FUNCTION cpa.rate_limit_hit_v1(p_tenant_id uuid, p_limit integer, p_window_seconds integer) FROM PUBLIC;
GRANT ALL ON FUNCTION cpa.rate_limit_hit_v1(p_tenant_id uuid, p_limit integer, p_window_seconds integer) TO authenticated;
GRANT ALL ON FUNCTION cpa.rate_limit_hit_v1(p_tenant_id uuid, p_limit integer, p_window_seconds integer) TO service_role;

-- TABLE private.plan_cache
CREATE TABLE private.plan_cache (
    tenant_id uuid NOT NULL,
    key text NOT NULL,
    plan jsonb NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    expires_at timestamp with time zone NOT NULL
);
-- COMMENT on TABLE private.plan_cache
COMMENT ON TABLE private.plan_cache IS 'Validated plans per tenant, keyed by normalised request and catalogue version.';
-- CONSTRAINT private.plan_cache plan_cache_pkey
ALTER TABLE ONLY private.plan_cache
    ADD CONSTRAINT plan_cache_pkey PRIMARY KEY (tenant_id, key);
-- ROW SECURITY private.plan_cache
ALTER TABLE private.plan_cache ENABLE ROW LEVEL SECURITY;

-- TABLE private.rate_limits
CREATE TABLE private.rate_limits (
    key text NOT NULL,
    window_start timestamp with time zone NOT NULL,
    hits integer DEFAULT 0 NOT NULL
);
-- COMMENT on TABLE private.rate_limits
COMMENT ON TABLE private.rate_limits IS 'Fixed-window request counters (Postgres-backed rate limiter).';
-- CONSTRAINT private.rate_limits rate_limits_pkey
ALTER TABLE ONLY private.rate_limits
    ADD CONSTRAINT rate_limits_pkey PRIMARY KEY (key, window_start);
-- ROW SECURITY private.rate_limits
ALTER TABLE private.rate_limits ENABLE ROW LEVEL SECURITY;
