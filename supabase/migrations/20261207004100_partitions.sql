-- Retention by partition (issue 24): job_events by day, audit_log by month.
--
-- Retention deleted events and audit entries row by row: at 100,000 jobs a day that is ~4
-- million event rows a day, each a WAL record, a dead tuple and vacuum work. Now both tables
-- are partitioned by range of created_at (native partitioning; pg_partman is not among the
-- extensions this project can count on locally) and retention drops whole partitions.
--
-- Conversion, without moving rows: the existing table becomes the partition of everything
-- before the end of the current day (month for audit_log), `private.<table>_legacy`; a new
-- parent takes the old name, built `like` the old table (so a column another migration added
-- comes along), with the old table's indexes (except the created_at ones retention read),
-- triggers, policies, grants, row level security and comments copied from the catalog rather
-- than spelled here. Then a default partition (an insert never fails for want of a partition)
-- and partitions ahead of time (cpa.partitions_ensure_v1). Partitions live in schema
-- `private`, which the Data API does not expose; each has row level security on and no grants:
-- they are read and written through their parent, whose policies apply.
--
-- What is recreated on each parent (copied from the old table at migration time):
--   job_events: primary key (id, created_at) (the key must hold the partition column; ids
--     still come from job_events_id_seq, now owned by the new parent's id); index
--     job_events_job_id_idx (job_id, id); trigger job_events_restage; policy "Job events are
--     visible to members of their tenant"; grants select to authenticated, select+insert to
--     service_role; row level security; table and column comments.
--   audit_log: primary key (id, created_at); index audit_log_tenant_created_idx; triggers
--     audit_log_append_only (row, cloned onto every partition) and audit_log_no_truncate (on
--     the parent and on each partition); policy "Audit entries are visible to members of their
--     tenant"; grants select to authenticated and service_role; row level security; comments.
--   Not recreated: job_events_created_brin and audit_log_created_idx (retention's created_at
--   range is now the partition bound; the legacy partitions keep theirs for their last batches).

-- Partition bounds ---------------------------------------------------------------------------
create function private.partition_bounds_v1(p_parent regclass)
returns table (part regclass, lower_bound timestamptz, upper_bound timestamptz, is_default boolean)
language sql stable set search_path = '' set timezone = 'UTC'
as $$
  select c.oid::regclass,
         nullif((regexp_match(b.expr, 'FROM \(''([^'']+)''\)'))[1], '')::timestamptz,
         nullif((regexp_match(b.expr, 'TO \(''([^'']+)''\)'))[1], '')::timestamptz,
         b.expr = 'DEFAULT'
    from pg_inherits i
    join pg_class c on c.oid = i.inhrelid
    cross join lateral (select pg_get_expr(c.relpartbound, c.oid) as expr) b
   where i.inhparent = p_parent
$$;
comment on function private.partition_bounds_v1 is 'The partitions of a table partitioned by a timestamptz range: bounds (null for MINVALUE/MAXVALUE) and whether it is the default partition.';
revoke execute on function private.partition_bounds_v1(regclass) from public, anon, authenticated, service_role;

-- One partition of [p_from, p_to), in schema private, rows of that range moved out of the
-- default partition first (they are there only if creation ever fell behind).
create function private.partition_create_v1(
  p_parent regclass, p_name text, p_from timestamptz, p_to timestamptz
) returns void
language plpgsql set search_path = '' set timezone = 'UTC'
as $$
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
$$;
comment on function private.partition_create_v1 is 'Attach a partition [p_from, p_to) of p_parent named private.p_name, moving the rows of that range out of the default partition.';
revoke execute on function private.partition_create_v1(regclass, text, timestamptz, timestamptz)
  from public, anon, authenticated, service_role;

-- Partitions ahead --------------------------------------------------------------------------
-- job_events by day, audit_log by month, from the current period to p_days_ahead days ahead;
-- a period a partition already covers (the legacy one, say) is skipped, a partly covered one
-- gets the rest. Called by every retention batch (the dispatcher's sweep) and by pg_cron where
-- there is no long-running dispatcher:
--   select cron.schedule('cpa-partitions', '7 * * * *', $$select cpa.partitions_ensure_v1()$$);
-- If neither ran for longer than the lead, rows land in the default partition and move to
-- their own partition when it is created.
create function cpa.partitions_ensure_v1(p_days_ahead integer default 7)
returns integer
language plpgsql security definer set search_path = '' set timezone = 'UTC'
set lock_timeout = '2s'
as $$
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
comment on function cpa.partitions_ensure_v1 is 'Create the partitions of job_events (daily) and audit_log (monthly) from now to p_days_ahead days ahead; returns how many it created. Run by each retention batch and by pg_cron.';
revoke execute on function cpa.partitions_ensure_v1(integer) from public, anon, authenticated;
grant execute on function cpa.partitions_ensure_v1(integer) to service_role;

-- The conversion (runs once, here) ------------------------------------------------------------
create function private.partition_convert_v1(p_table text, p_unit text)
returns void
language plpgsql set search_path = '' set timezone = 'UTC'
as $$
declare
  v_old regclass := ('public.' || p_table)::regclass;
  v_bound timestamptz;
  v_stmts text[];
  v_grants text[];
  v_indexes text[];
  v_seq text;
  v_comment text;
  v_rls boolean;
  v_force boolean;
  v_s text;
begin
  -- The legacy partition ends with the current period, or after its newest row.
  execute format('select greatest(date_trunc(%L, now()), date_trunc(%L, max(created_at)))'
                 ' + interval ''1 %s'' from %s', p_unit, p_unit, p_unit, v_old)
    into v_bound;

  -- Triggers and policies as their definitions read now (with search_path '' every name in
  -- them is qualified), to run against the new parent.
  select coalesce(array_agg(pg_get_triggerdef(t.oid) order by t.tgname), '{}') into v_stmts
    from pg_trigger t where t.tgrelid = v_old and not t.tgisinternal;
  select v_stmts || coalesce(array_agg(format('create policy %I on public.%I as %s for %s to %s%s%s',
           p.polname, p_table,
           case when p.polpermissive then 'permissive' else 'restrictive' end,
           case p.polcmd when 'r' then 'select' when 'a' then 'insert' when 'w' then 'update'
                         when 'd' then 'delete' else 'all' end,
           (select string_agg(case when r.oid = 0 then 'public' else quote_ident(g.rolname) end, ', ')
              from unnest(p.polroles) r(oid) left join pg_roles g on g.oid = r.oid),
           coalesce(' using (' || pg_get_expr(p.polqual, p.polrelid) || ')', ''),
           coalesce(' with check (' || pg_get_expr(p.polwithcheck, p.polrelid) || ')', ''))
           order by p.polname), '{}')
    into v_stmts
    from pg_policy p where p.polrelid = v_old;
  select coalesce(array_agg(format('grant %s on public.%I to %s', a.privilege_type, p_table,
                                   case when a.grantee = 0 then 'public'
                                        else quote_ident(a.grantee::regrole::text) end)), '{}')
    into v_grants
    from pg_class c cross join lateral aclexplode(c.relacl) a
   where c.oid = v_old and a.grantee <> c.relowner;
  -- Indexes but the primary key and those on created_at alone (retention's, now the bounds).
  select coalesce(array_agg(pg_get_indexdef(i.indexrelid)), '{}')
    into v_indexes
    from pg_index i
   where i.indrelid = v_old and not i.indisprimary
     and not (i.indnatts = 1 and i.indkey[0] = (select a.attnum from pg_attribute a
                                                 where a.attrelid = v_old and a.attname = 'created_at'));
  select pg_get_serial_sequence('public.' || p_table, 'id') into v_seq;
  select obj_description(v_old, 'pg_class'), c.relrowsecurity, c.relforcerowsecurity
    into v_comment, v_rls, v_force
    from pg_class c where c.oid = v_old;

  -- The old table becomes private.<table>_legacy, bare: its triggers would fire beside the
  -- parent's clones, and nobody reads it but through the parent.
  for v_s in select t.tgname from pg_trigger t where t.tgrelid = v_old and not t.tgisinternal loop
    execute format('drop trigger %I on public.%I', v_s, p_table);
  end loop;
  for v_s in select p.polname from pg_policy p where p.polrelid = v_old loop
    execute format('drop policy %I on public.%I', v_s, p_table);
  end loop;
  if v_seq is not null then
    execute format('alter sequence %s owned by none', v_seq);
  end if;
  execute format('alter table public.%I rename to %I', p_table, p_table || '_legacy');
  execute format('alter table public.%I set schema private', p_table || '_legacy');
  -- Its other indexes moved with it (the parent's copies take their names in public and adopt
  -- them at the attach); the key on id alone gives way to the parent's (id, created_at).
  execute format('alter table private.%I drop constraint %I', p_table || '_legacy',
                 p_table || '_pkey');
  execute format('revoke all on private.%I from public, anon, authenticated, service_role',
                 p_table || '_legacy');

  execute format('create table public.%I (like private.%I including defaults including constraints'
                 ' including comments including generated including storage including statistics)'
                 ' partition by range (created_at)', p_table, p_table || '_legacy');
  execute format('alter table public.%I add constraint %I primary key (id, created_at)',
                 p_table, p_table || '_pkey');
  foreach v_s in array v_indexes loop
    execute v_s;
  end loop;
  if v_seq is not null then
    execute format('alter sequence %s owned by public.%I.id', v_seq, p_table);
  end if;
  execute format('alter table public.%I attach partition private.%I for values from (minvalue) to (%L)',
                 p_table, p_table || '_legacy', v_bound);
  execute format('create table private.%I partition of public.%I default',
                 p_table || '_default', p_table);
  execute format('alter table private.%I enable row level security', p_table || '_default');
  execute format('alter table private.%I enable row level security', p_table || '_legacy');
  execute format('revoke all on private.%I from public, anon, authenticated, service_role',
                 p_table || '_default');

  foreach v_s in array v_stmts loop
    execute v_s;
  end loop;
  foreach v_s in array v_grants loop
    execute v_s;
  end loop;
  if v_rls then
    execute format('alter table public.%I enable row level security', p_table);
  end if;
  if v_force then
    execute format('alter table public.%I force row level security', p_table);
  end if;
  execute format('comment on table public.%I is %L', p_table, v_comment);
  if p_table = 'audit_log' then
    -- Statement triggers are not cloned onto partitions: each keeps its own truncate guard.
    create trigger audit_log_no_truncate before truncate on private.audit_log_legacy
      for each statement execute function private.audit_forbid_change_v1();
    create trigger audit_log_no_truncate before truncate on private.audit_log_default
      for each statement execute function private.audit_forbid_change_v1();
  end if;
end;
$$;
revoke execute on function private.partition_convert_v1(text, text) from public, anon, authenticated, service_role;

select private.partition_convert_v1('job_events', 'day');
select private.partition_convert_v1('audit_log', 'month');
drop function private.partition_convert_v1(text, text);
select cpa.partitions_ensure_v1(7);

comment on table private.job_events_legacy is 'job_events rows written before partitioning (20261207004100); dropped by retention once all are older than the retention.';
comment on table private.job_events_default is 'job_events rows no dated partition covers (creation ahead fell behind); moved out when their partition is created.';
comment on table private.audit_log_legacy is 'audit_log rows written before partitioning (20261207004100); dropped by retention once all are older than the retention.';
comment on table private.audit_log_default is 'audit_log rows no dated partition covers; moved out when their partition is created.';

-- Retention -----------------------------------------------------------------------------------
-- Same signature and answer as before, plus `partitions_dropped` and `partitions_created`:
-- 1. partitions ahead (cpa.partitions_ensure_v1);
-- 2. each partition wholly older than its cutoff is detached and dropped (a short ACCESS
--    EXCLUSIVE lock on the parent; lock_timeout makes a busy moment skip to the next sweep);
--    the legacy and default partitions, which hold older and newer rows, lose their old rows
--    in batches as before;
-- 3. finished jobs (and with them their ToDos and edges), in batches, only once the partition
--    of their events is gone: jobs finished before the oldest dated event partition still
--    standing. So the jobs_delete_events trigger finds no event to delete row by row.
create or replace function cpa.retention_prune_v1(
  p_job_days integer default 30, p_audit_days integer default 365, p_batch integer default 5000
) returns jsonb
language plpgsql security definer set search_path = '' set timezone = 'UTC'
as $$
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
$$;
comment on function cpa.retention_prune_v1 is 'One bounded pass of retention: partitions created ahead; job_events and audit_log partitions wholly older than p_job_days / p_audit_days dropped (the legacy and default partitions pruned in a batch); finished jobs whose events are gone, in a batch; the audit pruning is itself audited.';
revoke execute on function cpa.retention_prune_v1(integer, integer, integer) from public, anon, authenticated;
grant execute on function cpa.retention_prune_v1(integer, integer, integer) to service_role;

-- Hot tables: room for HOT updates -------------------------------------------------------------
-- A job row is updated at every ToDo completion (its todos_done count) and at each status
-- change; with the default fillfactor 100 the page it sits on is full and every such update
-- goes to another page and into every index. 80 leaves room (as on todos since the start);
-- vacuum sooner than the default 20 % of a table that keeps growing with history.
alter table public.jobs set (fillfactor = 80, autovacuum_vacuum_scale_factor = 0.02,
                             autovacuum_analyze_scale_factor = 0.02);
