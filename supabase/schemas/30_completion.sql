-- Completion: finishing, failing, releasing, cancelling and retrying work
--
-- Complete, fail and release act only on the exact lease owner's running ToDos (a
-- null owner matches nothing), fenced by attempt; completing releases dependents and
-- counts the job's done ToDos, finishing the job with its last one. A failure past its
-- retries fails the job and cancels what has not run; cancel and retry act on the
-- whole job. Every one of these takes the lock order of 20_claims.sql.
--
-- Generated from supabase/migrations by scripts/schemas.py; edit a migration (and
-- the header in that script), then run `python scripts/schemas.py write`.

set check_function_bodies = false;

-- FUNCTION cpa.agent_complete_v1(text, jsonb)
CREATE FUNCTION cpa.agent_complete_v1(p_agent_key text, p_items jsonb) RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    AS $$
begin
  return cpa.todo_complete_v4(private.agent_items_v1(p_agent_key, p_items));
end;
$$;
-- COMMENT on FUNCTION cpa.agent_complete_v1(p_agent_key text, p_items jsonb)
COMMENT ON FUNCTION cpa.agent_complete_v1(p_agent_key text, p_items jsonb) IS 'cpa.todo_complete_v4 for the ToDos the agent holds (owner private.agent_owner_v1(p_agent_key)); CP403 under another user''s agent id.';
-- ACL on FUNCTION cpa.agent_complete_v1(p_agent_key text, p_items jsonb)
REVOKE ALL ON FUNCTION cpa.agent_complete_v1(p_agent_key text, p_items jsonb) FROM PUBLIC;
GRANT ALL ON FUNCTION cpa.agent_complete_v1(p_agent_key text, p_items jsonb) TO authenticated;
GRANT ALL ON FUNCTION cpa.agent_complete_v1(p_agent_key text, p_items jsonb) TO service_role;

-- FUNCTION cpa.agent_fail_v1(text, jsonb, double precision)
CREATE FUNCTION cpa.agent_fail_v1(p_agent_key text, p_items jsonb, p_backoff_base double precision DEFAULT 1.0) RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    AS $$
begin
  return cpa.todo_fail_v2(private.agent_items_v1(p_agent_key, p_items), p_backoff_base);
end;
$$;
-- COMMENT on FUNCTION cpa.agent_fail_v1(p_agent_key text, p_items jsonb, p_backoff_base double precision)
COMMENT ON FUNCTION cpa.agent_fail_v1(p_agent_key text, p_items jsonb, p_backoff_base double precision) IS 'cpa.todo_fail_v2 for the ToDos the agent holds (owner private.agent_owner_v1(p_agent_key)); CP403 under another user''s agent id.';
-- ACL on FUNCTION cpa.agent_fail_v1(p_agent_key text, p_items jsonb, p_backoff_base double precision)
REVOKE ALL ON FUNCTION cpa.agent_fail_v1(p_agent_key text, p_items jsonb, p_backoff_base double precision) FROM PUBLIC;
GRANT ALL ON FUNCTION cpa.agent_fail_v1(p_agent_key text, p_items jsonb, p_backoff_base double precision) TO authenticated;
GRANT ALL ON FUNCTION cpa.agent_fail_v1(p_agent_key text, p_items jsonb, p_backoff_base double precision) TO service_role;

-- FUNCTION cpa.agent_release_v1(text, jsonb, boolean, integer)
CREATE FUNCTION cpa.agent_release_v1(p_agent_key text, p_items jsonb, p_refusal boolean DEFAULT false, p_max_refusals integer DEFAULT 3) RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    AS $$
begin
  return cpa.todo_release_v2(private.agent_items_v1(p_agent_key, p_items), p_refusal,
                             p_max_refusals);
end;
$$;
-- COMMENT on FUNCTION cpa.agent_release_v1(p_agent_key text, p_items jsonb, p_refusal boolean, p_max_refusals integer)
COMMENT ON FUNCTION cpa.agent_release_v1(p_agent_key text, p_items jsonb, p_refusal boolean, p_max_refusals integer) IS 'cpa.todo_release_v2 for the ToDos the agent holds (owner private.agent_owner_v1(p_agent_key)); CP403 under another user''s agent id.';
-- ACL on FUNCTION cpa.agent_release_v1(p_agent_key text, p_items jsonb, p_refusal boolean, p_max_refusals integer)
REVOKE ALL ON FUNCTION cpa.agent_release_v1(p_agent_key text, p_items jsonb, p_refusal boolean, p_max_refusals integer) FROM PUBLIC;
GRANT ALL ON FUNCTION cpa.agent_release_v1(p_agent_key text, p_items jsonb, p_refusal boolean, p_max_refusals integer) TO authenticated;
GRANT ALL ON FUNCTION cpa.agent_release_v1(p_agent_key text, p_items jsonb, p_refusal boolean, p_max_refusals integer) TO service_role;

-- FUNCTION cpa.job_cancel_v2(uuid)
CREATE FUNCTION cpa.job_cancel_v2(p_job_id uuid) RETURNS public.jobs
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    AS $$
declare
  v_job public.jobs;
begin
  perform private.job_authorized_v1(p_job_id);
  perform cpa.job_gate_v1(array[p_job_id]);
  select * into v_job from public.jobs j where j.id = p_job_id for no key update;
  if not found then
    raise exception 'not found' using errcode = 'P0002', hint = 'It does not exist or is not visible to you.';
  end if;
  if v_job.status = 'cancelled' then
    return v_job;
  end if;
  if v_job.status in ('done', 'failed') then
    raise exception 'The job is already %; only pending or running jobs can be cancelled.', v_job.status
      using errcode = '55000';
  end if;
  -- Running ToDos end too, in the statement before the job's: the job's event is its last.
  perform 1 from public.todos t
   where t.job_id = p_job_id and t.status in ('waiting', 'confirming', 'ready', 'running')
   order by t.id for no key update;
  update public.todos t
     set status = 'cancelled', finished_at = now(), updated_at = now(),
         lease_owner = null, lease_expires_at = null,
         error = case when t.status = 'running'
                      then 'Cancelled while it ran: the job was cancelled. A result its worker reports later is dropped.'
                      else t.error end
   where t.job_id = p_job_id and t.status in ('waiting', 'confirming', 'ready', 'running');
  update public.jobs j
     set status = 'cancelled', completed_at = now(), error = 'Cancelled on request.'
   where j.id = p_job_id
  returning * into v_job;
  return v_job;
end;
$$;
-- COMMENT on FUNCTION cpa.job_cancel_v2(p_job_id uuid)
COMMENT ON FUNCTION cpa.job_cancel_v2(p_job_id uuid) IS 'Cancel a job: its unstarted and running ToDos are cancelled before the job (its event is the last). Takes the job''s gate exclusively, then its row, then its ToDos by id.';
-- ACL on FUNCTION cpa.job_cancel_v2(p_job_id uuid)
REVOKE ALL ON FUNCTION cpa.job_cancel_v2(p_job_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION cpa.job_cancel_v2(p_job_id uuid) TO authenticated;
GRANT ALL ON FUNCTION cpa.job_cancel_v2(p_job_id uuid) TO service_role;

-- FUNCTION cpa.job_retry_v3(uuid)
CREATE FUNCTION cpa.job_retry_v3(p_job_id uuid) RETURNS public.jobs
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    AS $$
declare
  v_job public.jobs;
begin
  perform private.job_authorized_v1(p_job_id);
  perform cpa.job_gate_v1(array[p_job_id]);
  select * into v_job from public.jobs j where j.id = p_job_id for no key update;
  if not found then
    raise exception 'not found' using errcode = 'P0002', hint = 'It does not exist or is not visible to you.';
  end if;
  if v_job.status not in ('failed', 'cancelled') then
    raise exception 'The job is %; only failed or cancelled jobs can be retried.', v_job.status
      using errcode = '55000';
  end if;
  if v_job.retry_count >= v_job.max_retries then
    raise exception 'The job was already retried % times, the most allowed.', v_job.retry_count
      using errcode = '55000';
  end if;
  perform 1 from public.todos t
   where t.job_id = p_job_id and t.status in ('failed', 'cancelled')
   order by t.id for no key update;
  update public.todos t
     set deps_remaining = d.open,
         status = case when d.open > 0 then 'waiting'
                       when t.requires_confirmation and t.confirmed_at is null then 'confirming'
                       else 'ready' end,
         attempts = 0, lost_leases = 0, refusals = 0, error = null, result = null,
         finished_at = null, run_after = now(), timer_until = null, updated_at = now()
    from (
      select c.id,
             (select count(*) from public.todo_edges e join public.todos p on p.id = e.depends_on_id
               where e.todo_id = c.id and p.status <> 'done')::integer as open
        from public.todos c
       where c.job_id = p_job_id and c.status in ('failed', 'cancelled')
    ) d
   where t.id = d.id;
  -- Every ToDo already done: the job is done now.
  update public.jobs j
     set status = case when j.todos_done >= j.todo_count then 'done'
                       when j.todos_done > 0
                         or exists (select 1 from public.todos r
                                     where r.job_id = j.id and r.status = 'running')
                         then 'running'
                       else 'pending' end,
         error = null,
         completed_at = case when j.todos_done >= j.todo_count then now() end,
         retry_count = j.retry_count + 1
   where j.id = p_job_id
  returning * into v_job;
  return v_job;
end;
$$;
-- COMMENT on FUNCTION cpa.job_retry_v3(p_job_id uuid)
COMMENT ON FUNCTION cpa.job_retry_v3(p_job_id uuid) IS 'Retry a failed or cancelled job''s unfinished ToDos. Takes the job''s gate exclusively, then its row, then its ToDos by id.';
-- ACL on FUNCTION cpa.job_retry_v3(p_job_id uuid)
REVOKE ALL ON FUNCTION cpa.job_retry_v3(p_job_id uuid) FROM PUBLIC;
GRANT ALL ON FUNCTION cpa.job_retry_v3(p_job_id uuid) TO authenticated;
GRANT ALL ON FUNCTION cpa.job_retry_v3(p_job_id uuid) TO service_role;

-- FUNCTION cpa.todo_complete_claim_v4(jsonb, text, text, integer, double precision, uuid, text[], integer)
CREATE FUNCTION cpa.todo_complete_claim_v4(p_items jsonb, p_target text, p_owner text, p_limit integer, p_lease_seconds double precision DEFAULT 60, p_tenant_id uuid DEFAULT NULL::uuid, p_actions text[] DEFAULT NULL::text[], p_tenant_cap integer DEFAULT NULL::integer) RETURNS TABLE(done integer, todo public.todos)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    SET random_page_cost TO '1.1'
    AS $$
declare
  v_done uuid[];
  v_jobs uuid[];
  v_n integer := 0;
  v_rows public.todos[];
  v_start uuid[] := '{}';
begin
  if jsonb_array_length(coalesce(p_items, '[]'::jsonb)) > 0 then
    perform private.todo_jobs_gate_v1(
      array(select (i ->> 'id')::uuid from jsonb_array_elements(p_items) as i), false);
  end if;

  with items as (
    select (i ->> 'id')::uuid as id, i ->> 'owner' as owner, (i ->> 'attempt')::integer as attempt,
           i -> 'result' as result
      from jsonb_array_elements(coalesce(p_items, '[]'::jsonb)) as i
  ), upd as (
    update public.todos t
       set status = 'done', result = items.result, error = null, finished_at = now(),
           updated_at = now(), lease_owner = null, lease_expires_at = null
      from items
     where t.id = items.id and t.status = 'running'
       and t.lease_owner = items.owner
       and t.attempts = coalesce(items.attempt, t.attempts)
    returning t.id, t.job_id
  )
  select array_agg(upd.id), array_agg(upd.job_id) into v_done, v_jobs from upd;

  if v_done is not null then
    v_n := cardinality(v_done);
    perform private.todo_dependents_release_v1(v_done);
  end if;

  -- The claim waits for nothing (SKIP LOCKED), but the ToDos it picks stay held while the
  -- counts below wait for job rows. That is safe only because no transaction that holds a job
  -- row waits for a ToDo of another job: an exclusive writer waits only for ToDos of its own
  -- gated job (no completion of which runs beside it), and a transaction waits for no ToDo
  -- after its completions' counts (the dispatcher's report runs its exclusive operations
  -- first). Picking before the counts keeps the pick out of the time the job row is held.
  if p_limit > 0 then
    select array_agg(c) into v_rows
      from private.todo_claim_pick_v1(p_target, p_owner, p_limit, p_lease_seconds, p_tenant_id,
                                      p_actions, p_tenant_cap) c;
    v_start := array(select distinct r.job_id from unnest(v_rows) r);
  end if;
  if v_done is not null then
    perform private.job_counts_add_v1(v_jobs);
  end if;
  -- After the counts: a started job's row, held while the counts waited for another job's,
  -- would close a cycle with a completion that counts both in id order.
  if cardinality(v_start) > 0 then
    update public.jobs j
       set status = 'running', started_at = coalesce(j.started_at, now())
     where j.id in (select p.id from public.jobs p
                     where p.id = any(v_start) and p.status = 'pending'
                       for update skip locked);
  end if;

  if v_rows is null then
    return query select v_n, null::public.todos;
  else
    return query select v_n, r from unnest(v_rows) r;
  end if;
end;
$$;
-- COMMENT on FUNCTION cpa.todo_complete_claim_v4(p_items jsonb, p_target text, p_owner text, p_limit integer, p_lease_seconds double precision, p_tenant_id uuid, p_actions text[], p_tenant_cap integer)
COMMENT ON FUNCTION cpa.todo_complete_claim_v4(p_items jsonb, p_target text, p_owner text, p_limit integer, p_lease_seconds double precision, p_tenant_id uuid, p_actions text[], p_tenant_cap integer) IS 'As todo_complete_claim_v3, in the gate order: the completed ToDos'' jobs'' gates shared, the ToDos, the claim (SKIP LOCKED), the job rows, then the claimed pending jobs'' start (SKIP LOCKED). Rows: (done, claimed ToDo or null).';
-- ACL on FUNCTION cpa.todo_complete_claim_v4(p_items jsonb, p_target text, p_owner text, p_limit integer, p_lease_seconds double precision, p_tenant_id uuid, p_actions text[], p_tenant_cap integer)
REVOKE ALL ON FUNCTION cpa.todo_complete_claim_v4(p_items jsonb, p_target text, p_owner text, p_limit integer, p_lease_seconds double precision, p_tenant_id uuid, p_actions text[], p_tenant_cap integer) FROM PUBLIC;
GRANT ALL ON FUNCTION cpa.todo_complete_claim_v4(p_items jsonb, p_target text, p_owner text, p_limit integer, p_lease_seconds double precision, p_tenant_id uuid, p_actions text[], p_tenant_cap integer) TO service_role;

-- FUNCTION cpa.todo_complete_v4(jsonb)
CREATE FUNCTION cpa.todo_complete_v4(p_items jsonb) RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    AS $$
declare
  v_done uuid[];
  v_jobs uuid[];
  v_user boolean := private.caller_is_user_v1();
begin
  perform private.todo_jobs_gate_v1(
    array(select (i ->> 'id')::uuid from jsonb_array_elements(p_items) as i), false);
  -- Leased ToDos: no other reporter completes them, and no exclusive writer of their job runs.
  with items as (
    select (i ->> 'id')::uuid as id, i ->> 'owner' as owner, (i ->> 'attempt')::integer as attempt,
           i -> 'result' as result
      from jsonb_array_elements(p_items) as i
  ), upd as (
    update public.todos t
       set status = 'done', result = items.result, error = null, finished_at = now(),
           updated_at = now(), lease_owner = null, lease_expires_at = null
      from items
     where t.id = items.id and t.status = 'running'
       and t.lease_owner = items.owner
       and t.attempts = coalesce(items.attempt, t.attempts)
       and (not v_user or (items.owner like 'agent:%' and t.target = 'desktop'
                           and t.tenant_id in (select private.user_tenant_ids_v1())))
    returning t.id, t.job_id
  )
  select array_agg(upd.id), array_agg(upd.job_id) into v_done, v_jobs from upd;
  if v_done is null then
    return 0;
  end if;

  perform private.todo_dependents_release_v1(v_done);
  perform private.job_counts_add_v1(v_jobs);
  return cardinality(v_done);
end;
$$;
-- COMMENT on FUNCTION cpa.todo_complete_v4(p_items jsonb)
COMMENT ON FUNCTION cpa.todo_complete_v4(p_items jsonb) IS 'Complete leased ToDos in one transaction and release their dependents; a repeat or a stale lease changes nothing; a pending job starts or finishes with them. Takes the jobs'' gates shared, then the ToDos, then the job rows.';
-- ACL on FUNCTION cpa.todo_complete_v4(p_items jsonb)
REVOKE ALL ON FUNCTION cpa.todo_complete_v4(p_items jsonb) FROM PUBLIC;
GRANT ALL ON FUNCTION cpa.todo_complete_v4(p_items jsonb) TO authenticated;
GRANT ALL ON FUNCTION cpa.todo_complete_v4(p_items jsonb) TO service_role;

-- FUNCTION cpa.todo_confirm_v2(uuid, boolean)
CREATE FUNCTION cpa.todo_confirm_v2(p_todo_id uuid, p_approved boolean DEFAULT true) RETURNS public.todos
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    AS $$
declare
  v_todo public.todos;
begin
  -- Only a ToDo the caller may confirm gates its job; the next statement answers "not found" else.
  perform private.todo_jobs_gate_v1(array[p_todo_id], true);
  select * into v_todo from public.todos t where t.id = p_todo_id;
  if not found then
    raise exception 'not found' using errcode = 'P0002', hint = 'It does not exist or is not visible to you.';
  end if;
  perform private.tenant_authorize_v1(v_todo.tenant_id);
  perform 1 from public.jobs j where j.id = v_todo.job_id for no key update;
  select * into v_todo from public.todos t where t.id = p_todo_id for no key update;
  if v_todo.status in ('done', 'failed', 'cancelled') then
    raise exception 'The ToDo % is already %; there is nothing left to confirm.', v_todo.key, v_todo.status
      using errcode = '55000';
  end if;
  if not p_approved then
    perform private.todo_fail_terminal_v2(array[p_todo_id],
      array[format('The user declined %s.', v_todo.action)]);
  else
    update public.todos t
       set confirmed_at = coalesce(t.confirmed_at, now()),
           status = case when t.status = 'confirming' then 'ready' else t.status end,
           run_after = case when t.status = 'confirming' then greatest(t.run_after, now())
                            else t.run_after end,
           updated_at = now()
     where t.id = p_todo_id;
  end if;
  select * into v_todo from public.todos t where t.id = p_todo_id;
  return v_todo;
end;
$$;
-- COMMENT on FUNCTION cpa.todo_confirm_v2(p_todo_id uuid, p_approved boolean)
COMMENT ON FUNCTION cpa.todo_confirm_v2(p_todo_id uuid, p_approved boolean) IS 'Approve or decline a ToDo that waits for confirmation. Takes its job''s gate exclusively, then the job row, then the ToDo.';
-- ACL on FUNCTION cpa.todo_confirm_v2(p_todo_id uuid, p_approved boolean)
REVOKE ALL ON FUNCTION cpa.todo_confirm_v2(p_todo_id uuid, p_approved boolean) FROM PUBLIC;
GRANT ALL ON FUNCTION cpa.todo_confirm_v2(p_todo_id uuid, p_approved boolean) TO authenticated;
GRANT ALL ON FUNCTION cpa.todo_confirm_v2(p_todo_id uuid, p_approved boolean) TO service_role;

-- FUNCTION cpa.todo_fail_v2(jsonb, double precision)
CREATE FUNCTION cpa.todo_fail_v2(p_items jsonb, p_backoff_base double precision DEFAULT 1.0) RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    AS $$
declare
  v_ids uuid[];
  v_errors text[];
  v_retry boolean[];
  v_attempts integer[];
  v_retried integer;
  v_terminal uuid[];
  v_final text[];
  v_user boolean := private.caller_is_user_v1();
begin
  perform private.todo_jobs_lock_v1(
    array(select (i ->> 'id')::uuid from jsonb_array_elements(p_items) as i));

  select array_agg(s.id), array_agg(s.error), array_agg(s.retry), array_agg(s.attempts)
    into v_ids, v_errors, v_retry, v_attempts
    from (
      select t.id, left(coalesce(i ->> 'error', 'unknown error'), 4000) as error,
             coalesce((i ->> 'retryable')::boolean, false)
               and t.attempts - t.lost_leases < t.max_attempts as retry,
             case when coalesce((i ->> 'retryable')::boolean, false)
                  then t.attempts - t.lost_leases end as attempts
        from jsonb_array_elements(p_items) as i
        join public.todos t on t.id = (i ->> 'id')::uuid
       where t.status = 'running'
         and t.lease_owner = i ->> 'owner'
         and t.attempts = coalesce((i ->> 'attempt')::integer, t.attempts)
         and (not v_user or (i ->> 'owner' like 'agent:%' and t.target = 'desktop'
                             and t.tenant_id in (select private.user_tenant_ids_v1())))
       order by t.id
         for update of t
    ) s;
  if v_ids is null then
    return 0;
  end if;

  -- Exponential backoff over the failed attempts: base * 2^(n-1) seconds, at most 10 minutes.
  update public.todos t
     set status = 'ready', error = u.error, lease_owner = null, lease_expires_at = null,
         run_after = now() + make_interval(secs => least(600, greatest(0, least(p_backoff_base, 60))
                                                             * power(2, greatest(t.attempts - t.lost_leases, 1) - 1))),
         updated_at = now()
    from unnest(v_ids, v_errors, v_retry) as u(id, error, retry)
   where t.id = u.id and u.retry;
  get diagnostics v_retried = row_count;

  select array_agg(u.id),
         array_agg(case when u.attempts is null then u.error
                        else format('%s (gave up after %s attempts)', u.error, u.attempts) end)
    into v_terminal, v_final
    from unnest(v_ids, v_errors, v_retry, v_attempts) as u(id, error, retry, attempts)
   where not u.retry;
  if v_terminal is not null then
    perform private.todo_fail_terminal_v2(v_terminal, v_final);
  end if;
  return v_retried + coalesce(array_length(v_terminal, 1), 0);
end;
$$;
-- COMMENT on FUNCTION cpa.todo_fail_v2(p_items jsonb, p_backoff_base double precision)
COMMENT ON FUNCTION cpa.todo_fail_v2(p_items jsonb, p_backoff_base double precision) IS 'Fail leased ToDos: retryable errors back off through run_after until max_attempts failed attempts (lost leases do not count); otherwise the job fails and its unstarted ToDos are cancelled. Locks the jobs first, then the ToDos by id.';
-- ACL on FUNCTION cpa.todo_fail_v2(p_items jsonb, p_backoff_base double precision)
REVOKE ALL ON FUNCTION cpa.todo_fail_v2(p_items jsonb, p_backoff_base double precision) FROM PUBLIC;
GRANT ALL ON FUNCTION cpa.todo_fail_v2(p_items jsonb, p_backoff_base double precision) TO authenticated;
GRANT ALL ON FUNCTION cpa.todo_fail_v2(p_items jsonb, p_backoff_base double precision) TO service_role;

-- FUNCTION cpa.todo_release_v2(jsonb, boolean, integer)
CREATE FUNCTION cpa.todo_release_v2(p_items jsonb, p_refusal boolean DEFAULT false, p_max_refusals integer DEFAULT 3) RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    AS $$
declare
  v_released integer;
  v_spent uuid[];
  v_user boolean := private.caller_is_user_v1();
begin
  perform private.todo_jobs_lock_v1(
    array(select (i ->> 'id')::uuid from jsonb_array_elements(p_items) as i));

  with items as (
    select (i ->> 'id')::uuid as id, i ->> 'owner' as owner from jsonb_array_elements(p_items) as i
  ), mine as materialized (
    select t.id, t.refusals from public.todos t join items on items.id = t.id
     where t.status = 'running'
       and t.lease_owner = items.owner
       and (not v_user or (items.owner like 'agent:%' and t.target = 'desktop'
                           and t.tenant_id in (select private.user_tenant_ids_v1())))
     order by t.id
     for update of t
  ), upd as (
    update public.todos t
       set status = 'ready', attempts = greatest(t.attempts - 1, 0),
           refusals = t.refusals + case when p_refusal then 1 else 0 end,
           lease_owner = null, lease_expires_at = null, run_after = now(), updated_at = now()
      from mine
     where t.id = mine.id and (not p_refusal or mine.refusals + 1 < p_max_refusals)
    returning t.id
  )
  select (select count(*) from upd)::integer,
         (select array_agg(m.id) from mine m where p_refusal and m.refusals + 1 >= p_max_refusals)
    into v_released, v_spent;
  if v_spent is not null then
    perform private.todo_fail_terminal_v2(
      v_spent,
      array(select format('Refused by %s agents; no agent will run it.', p_max_refusals)
              from unnest(v_spent)));
  end if;
  return v_released + coalesce(array_length(v_spent, 1), 0);
end;
$$;
-- COMMENT on FUNCTION cpa.todo_release_v2(p_items jsonb, p_refusal boolean, p_max_refusals integer)
COMMENT ON FUNCTION cpa.todo_release_v2(p_items jsonb, p_refusal boolean, p_max_refusals integer) IS 'Give leases back (shutdown) or refuse them (counted; past p_max_refusals the ToDo fails). Locks the jobs first, then the ToDos by id.';
-- ACL on FUNCTION cpa.todo_release_v2(p_items jsonb, p_refusal boolean, p_max_refusals integer)
REVOKE ALL ON FUNCTION cpa.todo_release_v2(p_items jsonb, p_refusal boolean, p_max_refusals integer) FROM PUBLIC;
GRANT ALL ON FUNCTION cpa.todo_release_v2(p_items jsonb, p_refusal boolean, p_max_refusals integer) TO authenticated;
GRANT ALL ON FUNCTION cpa.todo_release_v2(p_items jsonb, p_refusal boolean, p_max_refusals integer) TO service_role;

-- FUNCTION private.job_counts_add_v1(uuid[])
CREATE FUNCTION private.job_counts_add_v1(p_jobs uuid[]) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    AS $$
begin
  perform 1 from public.jobs j where j.id = any(p_jobs) order by j.id for no key update;
  with n as (
    select u.job_id, count(*)::integer as k from unnest(p_jobs) u(job_id) group by u.job_id
  )
  update public.jobs j
     set todos_done = j.todos_done + n.k,
         status = case when j.status in ('pending', 'running') and j.todos_done + n.k >= j.todo_count
                         then 'done'
                       when j.status = 'pending' then 'running'
                       else j.status end,
         started_at = case when j.status = 'pending' then coalesce(j.started_at, now())
                           else j.started_at end,
         completed_at = case when j.status in ('pending', 'running') and j.todos_done + n.k >= j.todo_count
                             then now() else j.completed_at end
    from n
   where j.id = n.job_id;
end;
$$;
-- COMMENT on FUNCTION private.job_counts_add_v1(p_jobs uuid[])
COMMENT ON FUNCTION private.job_counts_add_v1(p_jobs uuid[]) IS 'Add completed ToDos to their jobs'' counts (rows locked in id order): a pending job starts, a job with all its ToDos done is done.';
-- ACL on FUNCTION private.job_counts_add_v1(p_jobs uuid[])
REVOKE ALL ON FUNCTION private.job_counts_add_v1(p_jobs uuid[]) FROM PUBLIC;

-- FUNCTION private.todo_dependents_release_v1(uuid[])
CREATE FUNCTION private.todo_dependents_release_v1(p_done uuid[]) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    AS $$
begin
  perform 1 from public.todos c
   where c.id in (select e.todo_id from public.todo_edges e where e.depends_on_id = any(p_done))
     and c.status = 'waiting'
   order by c.id for no key update;
  with rel as (
    select e.todo_id, count(*)::integer as n
      from public.todo_edges e where e.depends_on_id = any(p_done)
     group by e.todo_id
  )
  update public.todos c
     set deps_remaining = c.deps_remaining - rel.n,
         status = case when c.deps_remaining - rel.n > 0 then c.status
                       when c.requires_confirmation and c.confirmed_at is null then 'confirming'
                       else 'ready' end,
         run_after = case when c.deps_remaining - rel.n > 0 then c.run_after
                          else greatest(c.run_after, now()) end,
         updated_at = now()
    from rel
   where c.id = rel.todo_id and c.status = 'waiting';
end;
$$;
-- COMMENT on FUNCTION private.todo_dependents_release_v1(p_done uuid[])
COMMENT ON FUNCTION private.todo_dependents_release_v1(p_done uuid[]) IS 'Count the completion of these ToDos in their waiting dependents (locked in id order); those with none left become ready or confirming.';
-- ACL on FUNCTION private.todo_dependents_release_v1(p_done uuid[])
REVOKE ALL ON FUNCTION private.todo_dependents_release_v1(p_done uuid[]) FROM PUBLIC;

-- FUNCTION private.todo_fail_terminal_v2(uuid[], text[])
CREATE FUNCTION private.todo_fail_terminal_v2(p_ids uuid[], p_errors text[]) RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    AS $$
declare
  v_locked uuid[];
  v_jobs uuid[];
  v_count integer;
begin
  -- 1. the jobs; 2. the ToDos to fail and their jobs' unfinished ToDos, in one pass by id.
  select array_agg(x.id order by x.id) into v_locked
    from (
      select j.id from public.jobs j
       where j.id in (select t.job_id from public.todos t where t.id = any(p_ids))
       order by j.id
         for no key update
    ) x;
  if v_locked is null then
    return 0;
  end if;
  perform 1 from public.todos t
   where t.job_id = any(v_locked)
     and (t.id = any(p_ids) or t.status in ('waiting', 'confirming', 'ready', 'running'))
   order by t.id for no key update;

  with f as (
    select u.id, u.err from unnest(p_ids, p_errors) as u(id, err)
  ), upd as (
    update public.todos t
       set status = 'failed', error = f.err, finished_at = now(), updated_at = now(),
           lease_owner = null, lease_expires_at = null
      from f
     where t.id = f.id and t.status in ('waiting', 'confirming', 'ready', 'running')
    returning t.job_id, t.key
  )
  select array_agg(distinct upd.job_id), count(*) into v_jobs, v_count from upd;
  if v_count = 0 then
    return 0;
  end if;

  update public.todos t
     set status = 'cancelled', finished_at = now(), updated_at = now(),
         lease_owner = null, lease_expires_at = null,
         error = case when t.status = 'running'
                      then 'Cancelled while it ran: another ToDo of the job failed for good. A result its worker reports later is dropped.'
                      else t.error end
   where t.job_id = any(v_jobs) and t.status in ('waiting', 'confirming', 'ready', 'running');

  update public.jobs j
     set status = 'failed', completed_at = now(),
         error = (select format('ToDo %L failed: %s', t.key, t.error) from public.todos t
                   where t.job_id = j.id and t.status = 'failed' order by t.finished_at desc limit 1)
   where j.id = any(v_jobs) and j.status in ('pending', 'running');
  return v_count;
end;
$$;
-- COMMENT on FUNCTION private.todo_fail_terminal_v2(p_ids uuid[], p_errors text[])
COMMENT ON FUNCTION private.todo_fail_terminal_v2(p_ids uuid[], p_errors text[]) IS 'Fail ToDos for good: their jobs fail, and the jobs'' unstarted and running ToDos end cancelled before the job does. Locks the jobs first, then the ToDos by id.';
-- ACL on FUNCTION private.todo_fail_terminal_v2(p_ids uuid[], p_errors text[])
REVOKE ALL ON FUNCTION private.todo_fail_terminal_v2(p_ids uuid[], p_errors text[]) FROM PUBLIC;
