-- Retention: nothing pruned job_events or finished jobs, and audit_log only grows. The
-- dispatcher's sweep calls cpa.retention_prune_v1 (long-running mode hourly, the scheduled
-- function at most hourly per warm container), in bounded batches so a backlog never holds
-- long locks. Defaults: job_events and finished jobs after 30 days, audit_log after 365
-- (CPA_RETENTION_DAYS, CPA_AUDIT_RETENTION_DAYS). Deleting a job is audited as before (its
-- audit trigger); pruning audit_log itself writes one audit entry saying how much went.
-- On Supabase without a long-running worker, pg_cron can call the same function:
--   select cron.schedule('cpa-retention', '17 * * * *', $$select cpa.retention_prune_v1()$$);

-- audit_log stays append-only for every role; the one exception is this function, which sets
-- a transaction-local flag the guard accepts for DELETE. Only the table owner may delete
-- rows at all (no role has a DELETE grant), so the flag opens nothing to API roles.
create or replace function private.audit_forbid_change_v1()
returns trigger
language plpgsql set search_path = ''
as $$
begin
  if tg_op = 'DELETE' and current_setting('cpa.audit_prune', true) = 'on' then
    return old;
  end if;
  raise exception 'audit_log is append-only; % is not allowed', tg_op using errcode = '42501';
end;
$$;

create index if not exists job_events_created_idx on public.job_events (created_at);
create index if not exists jobs_finished_idx on public.jobs (completed_at)
  where status in ('done', 'failed', 'cancelled');
create index if not exists audit_log_created_idx on public.audit_log (created_at);

create function cpa.retention_prune_v1(
  p_job_days integer default 30, p_audit_days integer default 365, p_batch integer default 5000
) returns jsonb
language plpgsql security definer set search_path = ''
as $$
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
comment on function cpa.retention_prune_v1 is 'Prune job_events and finished jobs older than p_job_days and audit_log older than p_audit_days, one bounded batch each; the audit pruning is itself audited.';

-- grants ---------------------------------------------------------------------------------------
revoke execute on function cpa.retention_prune_v1(integer, integer, integer) from public, anon, authenticated;
grant execute on function cpa.retention_prune_v1(integer, integer, integer) to service_role;
