-- Retention: pruning finished jobs and old audit rows
--
-- One bounded batch each: events older than the job window (of any job), finished
-- jobs older than it with their ToDos, edges and events, idempotency keys, and audit
-- rows older than the audit window; run it again until it prunes nothing.
--
-- Generated from supabase/migrations by scripts/schemas.py; edit a migration (and
-- the header in that script), then run `python scripts/schemas.py write`.

set check_function_bodies = false;

-- FUNCTION cpa.partitions_ensure_v1(integer)
CREATE FUNCTION cpa.partitions_ensure_v1(p_days_ahead integer DEFAULT 7) RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    SET "TimeZone" TO 'UTC'
    SET lock_timeout TO '2s'
    AS $$
declare
  v_spec record;
  v_start timestamptz;
  v_end timestamptz;
  v_lo timestamptz;
  v_hi timestamptz;
  v_made integer := 0;
begin
  for v_spec in
    select * from (values ('public.job_events'::regclass, 'job_events', 'day', 'YYYYMMDD'),
                          ('public.audit_log'::regclass, 'audit_log', 'month', 'YYYYMM'))
                  as s(parent, name, unit, fmt)
  loop
    v_start := date_trunc(v_spec.unit, now());
    while v_start <= now() + make_interval(days => greatest(p_days_ahead, 1)) loop
      v_end := v_start + ('1 ' || v_spec.unit)::interval;
      -- The part of [v_start, v_end) no range partition covers yet.
      select coalesce(max(b.upper_bound), v_start) into v_lo
        from private.partition_bounds_v1(v_spec.parent) b
       where not b.is_default and coalesce(b.lower_bound, '-infinity') <= v_start
         and b.upper_bound > v_start;
      select coalesce(min(b.lower_bound), v_end) into v_hi
        from private.partition_bounds_v1(v_spec.parent) b
       where not b.is_default and b.lower_bound > v_lo and b.lower_bound < v_end;
      if v_lo < least(v_hi, v_end) then
        perform private.partition_create_v1(
          v_spec.parent, v_spec.name || '_p' || to_char(v_lo, v_spec.fmt)
                         || case when v_lo <> v_start then to_char(v_lo, '"_"HH24MISS') else '' end,
          v_lo, least(v_hi, v_end));
        v_made := v_made + 1;
      end if;
      v_start := v_end;
    end loop;
  end loop;
  return v_made;
end;
$$;
-- COMMENT on FUNCTION cpa.partitions_ensure_v1(p_days_ahead integer)
COMMENT ON FUNCTION cpa.partitions_ensure_v1(p_days_ahead integer) IS 'Create the partitions of job_events (daily) and audit_log (monthly) from now to p_days_ahead days ahead; returns how many it created. Run by each retention batch and by pg_cron.';
-- ACL on FUNCTION cpa.partitions_ensure_v1(p_days_ahead integer)
REVOKE ALL ON FUNCTION cpa.partitions_ensure_v1(p_days_ahead integer) FROM PUBLIC;
GRANT ALL ON FUNCTION cpa.partitions_ensure_v1(p_days_ahead integer) TO service_role;

-- FUNCTION cpa.retention_prune_v1(integer, integer, integer)
CREATE FUNCTION cpa.retention_prune_v1(p_job_days integer DEFAULT 30, p_audit_days integer DEFAULT 365, p_batch integer DEFAULT 5000) RETURNS jsonb
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    SET "TimeZone" TO 'UTC'
    AS $_$
declare
  v_job_cutoff timestamptz := now() - make_interval(days => greatest(p_job_days, 1));
  v_audit_cutoff timestamptz := now() - make_interval(days => greatest(p_audit_days, 1));
  v_jobs_before timestamptz;
  v_part record;
  v_n integer;
  v_events integer := 0;
  v_jobs integer;
  v_keys integer;
  v_audit integer := 0;
  v_dropped integer := 0;
  v_created integer := 0;
  v_dropped_audit jsonb := '[]';
  v_lock_timeout text := current_setting('lock_timeout');
begin
  begin
    v_created := cpa.partitions_ensure_v1(7);
  exception when lock_not_available then
    v_created := 0;  -- busy: the next sweep (or the default partition) covers it
  end;

  for v_part in
    select 'public.job_events'::regclass as parent, b.*, v_job_cutoff as cutoff
      from private.partition_bounds_v1('public.job_events') b
    union all
    select 'public.audit_log'::regclass, b.*, v_audit_cutoff
      from private.partition_bounds_v1('public.audit_log') b
    order by 1, 3 nulls first
  loop
    if not v_part.is_default and v_part.upper_bound <= v_part.cutoff then
      begin
        perform set_config('lock_timeout', '2s', true);  -- undone with the block on error
        -- The row count from the statistics (a count(*) would read the whole partition).
        select c.reltuples::integer into v_n from pg_class c where c.oid = v_part.part;
        if v_n < 0 then
          execute format('select count(*) from %s', v_part.part) into v_n;
        end if;
        if v_part.parent = 'public.audit_log'::regclass then
          v_audit := v_audit + v_n;
          v_dropped_audit := v_dropped_audit || jsonb_build_object(
            'partition', v_part.part::text, 'from', v_part.lower_bound, 'to', v_part.upper_bound,
            'rows', v_n);
        else
          v_events := v_events + v_n;
        end if;
        execute format('alter table %s detach partition %s', v_part.parent, v_part.part);
        execute format('drop table %s', v_part.part);
        v_dropped := v_dropped + 1;
        perform set_config('lock_timeout', v_lock_timeout, true);
      exception when lock_not_available then
        null;  -- readers or writers held the parent: next sweep
      end;
    elsif v_part.lower_bound is null or v_part.is_default then
      -- The legacy and default partitions: their rows older than the cutoff, one batch.
      if v_part.parent = 'public.audit_log'::regclass then
        perform set_config('cpa.audit_prune', 'on', true);
        execute format('delete from %s a where a.ctid = any(array(select x.ctid from %s x'
                       ' where x.created_at < $1 limit $2))', v_part.part, v_part.part)
          using v_part.cutoff, p_batch;
        get diagnostics v_n = row_count;
        perform set_config('cpa.audit_prune', 'off', true);
        v_audit := v_audit + v_n;
      else
        execute format('delete from %s e where e.ctid = any(array(select x.ctid from %s x'
                       ' where x.created_at < $1 limit $2))', v_part.part, v_part.part)
          using v_part.cutoff, p_batch;
        get diagnostics v_n = row_count;
        v_events := v_events + v_n;
      end if;
    end if;
  end loop;

  -- Finished jobs whose events' partition is gone (or, while the legacy partition still holds
  -- the old events, by the cutoff as before).
  select least(v_job_cutoff, coalesce(min(b.lower_bound), v_job_cutoff)) into v_jobs_before
    from private.partition_bounds_v1('public.job_events') b
   where not b.is_default and b.lower_bound is not null;
  if exists (select 1 from private.partition_bounds_v1('public.job_events') b
              where b.lower_bound is null and not b.is_default) then
    v_jobs_before := v_job_cutoff;
  end if;
  delete from public.jobs j
   where j.id in (select x.id from public.jobs x
                   where x.status in ('done', 'failed', 'cancelled') and x.completed_at < v_jobs_before
                   order by x.completed_at limit greatest(p_batch / 10, 1));
  get diagnostics v_jobs = row_count;

  delete from private.job_idempotency i
   where (i.tenant_id, i.key) in (select x.tenant_id, x.key from private.job_idempotency x
                                   where x.created_at < v_job_cutoff limit p_batch);
  get diagnostics v_keys = row_count;

  if v_audit > 0 then
    insert into public.audit_log (tenant_id, actor_id, actor_role, action, entity, entity_id, before, after)
    values (null, null, coalesce(nullif(current_setting('role', true), 'none'), session_user),
            'DELETE', 'audit_log', null,
            jsonb_build_object('pruned', v_audit, 'older_than', v_audit_cutoff,
                               'retention_days', p_audit_days, 'partitions', v_dropped_audit),
            null);
  end if;
  return jsonb_build_object('job_events', v_events, 'jobs', v_jobs, 'idempotency_keys', v_keys,
                            'audit_log', v_audit, 'partitions_dropped', v_dropped,
                            'partitions_created', v_created);
end;
$_$;
-- COMMENT on FUNCTION cpa.retention_prune_v1(p_job_days integer, p_audit_days integer, p_batch integer)
COMMENT ON FUNCTION cpa.retention_prune_v1(p_job_days integer, p_audit_days integer, p_batch integer) IS 'One bounded pass of retention: partitions created ahead; job_events and audit_log partitions wholly older than p_job_days / p_audit_days dropped (the legacy and default partitions pruned in a batch); finished jobs whose events are gone, in a batch; the audit pruning is itself audited.';
-- ACL on FUNCTION cpa.retention_prune_v1(p_job_days integer, p_audit_days integer, p_batch integer)
REVOKE ALL ON FUNCTION cpa.retention_prune_v1(p_job_days integer, p_audit_days integer, p_batch integer) FROM PUBLIC;
GRANT ALL ON FUNCTION cpa.retention_prune_v1(p_job_days integer, p_audit_days integer, p_batch integer) TO service_role;

-- FUNCTION private.partition_bounds_v1(regclass)
CREATE FUNCTION private.partition_bounds_v1(p_parent regclass) RETURNS TABLE(part regclass, lower_bound timestamp with time zone, upper_bound timestamp with time zone, is_default boolean)
    LANGUAGE sql STABLE
    SET search_path TO ''
    SET "TimeZone" TO 'UTC'
    AS $$
  select c.oid::regclass,
         nullif((regexp_match(b.expr, 'FROM \(''([^'']+)''\)'))[1], '')::timestamptz,
         nullif((regexp_match(b.expr, 'TO \(''([^'']+)''\)'))[1], '')::timestamptz,
         b.expr = 'DEFAULT'
    from pg_inherits i
    join pg_class c on c.oid = i.inhrelid
    cross join lateral (select pg_get_expr(c.relpartbound, c.oid) as expr) b
   where i.inhparent = p_parent
$$;
-- COMMENT on FUNCTION private.partition_bounds_v1(p_parent regclass)
COMMENT ON FUNCTION private.partition_bounds_v1(p_parent regclass) IS 'The partitions of a table partitioned by a timestamptz range: bounds (null for MINVALUE/MAXVALUE) and whether it is the default partition.';
-- ACL on FUNCTION private.partition_bounds_v1(p_parent regclass)
REVOKE ALL ON FUNCTION private.partition_bounds_v1(p_parent regclass) FROM PUBLIC;

-- FUNCTION private.partition_create_v1(regclass, text, timestamp with time zone, timestamp with time zone)
CREATE FUNCTION private.partition_create_v1(p_parent regclass, p_name text, p_from timestamp with time zone, p_to timestamp with time zone) RETURNS void
    LANGUAGE plpgsql
    SET search_path TO ''
    SET "TimeZone" TO 'UTC'
    AS $_$
declare
  v_default regclass;
begin
  execute format('create table private.%I (like %s including defaults including constraints)',
                 p_name, p_parent);
  select b.part into v_default from private.partition_bounds_v1(p_parent) b where b.is_default;
  if v_default is not null then
    -- audit_log's guard lets this function's move through (the rows stay, in a new place).
    perform set_config('cpa.audit_prune', 'on', true);
    execute format('with moved as (delete from %s where created_at >= $1 and created_at < $2'
                   ' returning *) insert into private.%I select * from moved', v_default, p_name)
      using p_from, p_to;
    perform set_config('cpa.audit_prune', 'off', true);
  end if;
  execute format('alter table %s attach partition private.%I for values from (%L) to (%L)',
                 p_parent, p_name, p_from, p_to);
  execute format('alter table private.%I enable row level security', p_name);
  execute format('revoke all on private.%I from public, anon, authenticated, service_role', p_name);
  if p_parent = 'public.audit_log'::regclass then
    execute format('create trigger audit_log_no_truncate before truncate on private.%I'
                   ' for each statement execute function private.audit_forbid_change_v1()', p_name);
  end if;
end;
$_$;
-- COMMENT on FUNCTION private.partition_create_v1(p_parent regclass, p_name text, p_from timestamp with time zone, p_to timestamp with time zone)
COMMENT ON FUNCTION private.partition_create_v1(p_parent regclass, p_name text, p_from timestamp with time zone, p_to timestamp with time zone) IS 'Attach a partition [p_from, p_to) of p_parent named private.p_name, moving the rows of that range out of the default partition.';
-- ACL on FUNCTION private.partition_create_v1(p_parent regclass, p_name text, p_from timestamp with time zone, p_to timestamp with time zone)
REVOKE ALL ON FUNCTION private.partition_create_v1(p_parent regclass, p_name text, p_from timestamp with time zone, p_to timestamp with time zone) FROM PUBLIC;
