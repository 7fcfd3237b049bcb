-- Retention: pruning finished jobs and old audit rows
--
-- One bounded batch each: events older than the job window (of any job), finished
-- jobs older than it with their ToDos, edges and events, idempotency keys, and audit
-- rows older than the audit window; run it again until it prunes nothing.
--
-- Generated from supabase/migrations by scripts/schemas.py; edit a migration (and
-- the header in that script), then run `python scripts/schemas.py write`.

set check_function_bodies = false;

-- FUNCTION cpa.retention_prune_v1(integer, integer, integer)
CREATE FUNCTION cpa.retention_prune_v1(p_job_days integer DEFAULT 30, p_audit_days integer DEFAULT 365, p_batch integer DEFAULT 5000) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    AS $$
declare
  v_job_cutoff timestamptz := now() - make_interval(days => greatest(p_job_days, 1));
  v_audit_cutoff timestamptz := now() - make_interval(days => greatest(p_audit_days, 1));
  v_events integer;
  v_jobs integer;
  v_keys integer;
  v_audit integer;
begin
  delete from public.job_events e
   where e.id in (select x.id from public.job_events x where x.created_at < v_job_cutoff
                   order by x.created_at limit p_batch);
  get diagnostics v_events = row_count;

  -- Finished jobs only: their ToDos, edges and events go with them (on delete cascade).
  delete from public.jobs j
   where j.id in (select x.id from public.jobs x
                   where x.status in ('done', 'failed', 'cancelled') and x.completed_at < v_job_cutoff
                   order by x.completed_at limit greatest(p_batch / 10, 1));
  get diagnostics v_jobs = row_count;

  delete from private.job_idempotency i
   where (i.tenant_id, i.key) in (select x.tenant_id, x.key from private.job_idempotency x
                                   where x.created_at < v_job_cutoff limit p_batch);
  get diagnostics v_keys = row_count;

  perform set_config('cpa.audit_prune', 'on', true);
  delete from public.audit_log a
   where a.id in (select x.id from public.audit_log x where x.created_at < v_audit_cutoff
                   order by x.created_at limit p_batch);
  get diagnostics v_audit = row_count;
  perform set_config('cpa.audit_prune', 'off', true);
  if v_audit > 0 then
    insert into public.audit_log (tenant_id, actor_id, actor_role, action, entity, entity_id, before, after)
    values (null, null, coalesce(nullif(current_setting('role', true), 'none'), session_user),
            'DELETE', 'audit_log', null,
            jsonb_build_object('pruned', v_audit, 'older_than', v_audit_cutoff,
                               'retention_days', p_audit_days),
            null);
  end if;
  return jsonb_build_object('job_events', v_events, 'jobs', v_jobs, 'idempotency_keys', v_keys,
                            'audit_log', v_audit);
end;
$$;
-- COMMENT on FUNCTION cpa.retention_prune_v1(p_job_days integer, p_audit_days integer, p_batch integer)
COMMENT ON FUNCTION cpa.retention_prune_v1(p_job_days integer, p_audit_days integer, p_batch integer) IS 'Prune job_events and finished jobs older than p_job_days and audit_log older than p_audit_days, one bounded batch each; the audit pruning is itself audited.';
-- ACL on FUNCTION cpa.retention_prune_v1(p_job_days integer, p_audit_days integer, p_batch integer)
REVOKE ALL ON FUNCTION cpa.retention_prune_v1(p_job_days integer, p_audit_days integer, p_batch integer) FROM PUBLIC;
GRANT ALL ON FUNCTION cpa.retention_prune_v1(p_job_days integer, p_audit_days integer, p_batch integer) TO service_role;
