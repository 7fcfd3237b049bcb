-- Review of the merged issue-15 branches: fixes.
--
-- 1. A retried job with nothing left to run. job_cancel lets running ToDos finish; when they all
--    finish done, the job is still 'cancelled' with todos_done = todo_count. job_retry_v2 then
--    restarted nothing (no failed or cancelled ToDo) and set the job 'running': no completion
--    would ever come to finish it, so it stayed running for good (found by
--    tests/integration/test_review_stress.py; tests/integration/test_review_findings.py).
--    cpa.job_retry_v3 finishes such a job ('done') instead. Retried at todos_done = 0 while a
--    ToDo still ran, v2 set it 'pending', which no completion finishes: v3 sets it 'running'
--    while any of its ToDos runs. v2 and v1 run the v3 body. Same lock order as v2: the job
--    row, then its ToDos by id.

create function cpa.job_retry_v3(p_job_id uuid)
returns public.jobs
language plpgsql security definer set search_path = ''
as $$
declare
  v_job public.jobs;
begin
  perform private.job_authorized_v1(p_job_id);
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
         attempts = 0, refusals = 0, error = null, result = null, finished_at = null,
         run_after = now(), timer_until = null, updated_at = now()
    from (
      select c.id,
             (select count(*) from public.todo_edges e join public.todos p on p.id = e.depends_on_id
               where e.todo_id = c.id and p.status <> 'done')::integer as open
        from public.todos c
       where c.job_id = p_job_id and c.status in ('failed', 'cancelled')
    ) d
   where t.id = d.id;
  -- Every ToDo already done (the running ones a cancel let finish): the job is done now.
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
comment on function cpa.job_retry_v3 is 'Retry a failed or cancelled job: its failed and cancelled ToDos start again; a job whose ToDos are all done already ends done. Locks the job first, then its ToDos by id.';
revoke execute on function cpa.job_retry_v3(uuid) from public, anon;
grant execute on function cpa.job_retry_v3(uuid) to authenticated, service_role;

create or replace function cpa.job_retry_v2(p_job_id uuid)
returns public.jobs
language sql security definer set search_path = ''
as $$
  select * from cpa.job_retry_v3(p_job_id)
$$;
revoke execute on function cpa.job_retry_v2(uuid) from public, anon;
grant execute on function cpa.job_retry_v2(uuid) to authenticated, service_role;

-- 2. A job whose start a claim skipped. The claims start a claimed ToDo's pending job with FOR
--    UPDATE SKIP LOCKED ("a later claim starts it"). When the row is held at that moment
--    (job_route_v2 for an agent's route message, the desktop sweep, a report on another of its
--    ToDos) and no later claim of that job comes (its last ToDos), the ToDos complete on a
--    'pending' job, and the completions finished only 'running' jobs: pending for good with
--    every ToDo done. cpa.todo_complete_v3 and cpa.todo_complete_claim_v3 count on a pending
--    job as on a running one: it starts (or finishes) with its completions. Same locks and lock
--    order as v2 (the job rows are already held when they are counted); v2 (and through it v1
--    and the sweep) run the v3 bodies.

create function cpa.todo_complete_v3(p_items jsonb)
returns integer
language plpgsql security definer set search_path = ''
as $$
declare
  v_locked uuid[];
  v_done uuid[];
  v_jobs uuid[];
  v_user boolean := private.caller_is_user_v1();
begin
  v_locked := private.todo_jobs_lock_v1(
    array(select (i ->> 'id')::uuid from jsonb_array_elements(p_items) as i));
  perform 1 from public.todos t
   where t.id in (select (i ->> 'id')::uuid from jsonb_array_elements(p_items) as i)
     and t.job_id = any(v_locked) and t.status = 'running'
   order by t.id for no key update;
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
  select array_agg(upd.id), array_agg(distinct upd.job_id) into v_done, v_jobs from upd;
  if v_done is null then
    return 0;
  end if;

  perform 1 from public.todos c
   where c.id in (select e.todo_id from public.todo_edges e where e.depends_on_id = any(v_done))
     and c.status = 'waiting'
   order by c.id for no key update;
  with rel as (
    select e.todo_id, count(*)::integer as n
      from public.todo_edges e where e.depends_on_id = any(v_done)
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

  with n as (
    select t.job_id, count(*)::integer as k from public.todos t where t.id = any(v_done) group by t.job_id
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
  return array_length(v_done, 1);
end;
$$;
comment on function cpa.todo_complete_v3 is 'Complete leased ToDos in one transaction and release their dependents; a repeat or a stale lease changes nothing; a pending job (its start skipped by a claim) starts or finishes with them. Locks the jobs first, then the ToDos by id.';
revoke execute on function cpa.todo_complete_v3(jsonb) from public, anon;
grant execute on function cpa.todo_complete_v3(jsonb) to authenticated, service_role;

create or replace function cpa.todo_complete_v2(p_items jsonb)
returns integer
language sql security definer set search_path = ''
as $$
  select cpa.todo_complete_v3(p_items)
$$;
revoke execute on function cpa.todo_complete_v2(jsonb) from public, anon;
grant execute on function cpa.todo_complete_v2(jsonb) to authenticated, service_role;

create function cpa.todo_complete_claim_v3(
  p_items jsonb,
  p_target text,
  p_owner text,
  p_limit integer,
  p_lease_seconds double precision default 60,
  p_tenant_id uuid default null,
  p_actions text[] default null,
  p_tenant_cap integer default null
) returns table (done integer, todo public.todos)
language plpgsql security definer set search_path = '' set random_page_cost = 1.1
as $$
declare
  v_done uuid[];
  v_jobs uuid[];
  v_n integer := 0;
  v_rows public.todos[];
  v_start uuid[] := '{}';
begin
  if jsonb_array_length(coalesce(p_items, '[]'::jsonb)) > 0 then
    perform private.todo_jobs_lock_v1(
      array(select (i ->> 'id')::uuid from jsonb_array_elements(p_items) as i));
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
    perform 1 from public.todos c
     where c.id in (select e.todo_id from public.todo_edges e where e.depends_on_id = any(v_done))
       and c.status = 'waiting'
     order by c.id for no key update;
    with rel as (
      select e.todo_id, count(*)::integer as n
        from public.todo_edges e where e.depends_on_id = any(v_done)
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
  end if;

  if p_limit > 0 then
    select array_agg(c) into v_rows
      from private.todo_claim_pick_v1(p_target, p_owner, p_limit, p_lease_seconds, p_tenant_id,
                                      p_actions, p_tenant_cap) c;
    v_start := array(select distinct r.job_id from unnest(v_rows) r);
  end if;

  if cardinality(v_start) > 0 then
    update public.jobs j
       set status = 'running', started_at = coalesce(j.started_at, now())
     where j.id in (select p.id from public.jobs p
                     where p.id = any(v_start) and p.status = 'pending'
                       for update skip locked);
  end if;
  if v_done is not null then
    with n as (
      select u.job_id, count(*)::integer as k from unnest(v_jobs) u(job_id) group by u.job_id
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
  end if;

  if v_rows is null then
    return query select v_n, null::public.todos;
  else
    return query select v_n, r from unnest(v_rows) r;
  end if;
end;
$$;
comment on function cpa.todo_complete_claim_v3 is 'As todo_complete_claim_v2; a pending job (its start skipped by a claim) starts or finishes with its completions. Rows: (done, claimed ToDo or null).';
revoke execute on function
  cpa.todo_complete_claim_v3(jsonb, text, text, integer, double precision, uuid, text[], integer)
  from public, anon, authenticated;
grant execute on function
  cpa.todo_complete_claim_v3(jsonb, text, text, integer, double precision, uuid, text[], integer)
  to service_role;

create or replace function cpa.todo_complete_claim_v2(
  p_items jsonb,
  p_target text,
  p_owner text,
  p_limit integer,
  p_lease_seconds double precision default 60,
  p_tenant_id uuid default null,
  p_actions text[] default null,
  p_tenant_cap integer default null
) returns table (done integer, todo public.todos)
language sql security definer set search_path = ''
as $$
  select * from cpa.todo_complete_claim_v3(p_items, p_target, p_owner, p_limit, p_lease_seconds,
                                           p_tenant_id, p_actions, p_tenant_cap)
$$;
revoke execute on function
  cpa.todo_complete_claim_v2(jsonb, text, text, integer, double precision, uuid, text[], integer)
  from public, anon, authenticated;
grant execute on function
  cpa.todo_complete_claim_v2(jsonb, text, text, integer, double precision, uuid, text[], integer)
  to service_role;
