-- Complete-and-claim in the lock order, and the cheaper flush with generic plans (issue 15,
-- the merge of three branches).
--
-- 20261128000200_cancel_lock_order set one lock order for every state change: job rows first
-- (FOR NO KEY UPDATE, ascending id), then ToDo rows, then the flush's advisory locks at commit.
-- 20261128000300_drain_fast, written beside it, kept todo_complete_v1's old order in
-- cpa.todo_complete_claim_v1: it completed its ToDos and released their dependents (row locks
-- on ToDos), then waited for the job rows. A cancel holds the job row and then waits for the
-- job's ToDos: each waited for the other (40P01). tests/integration/test_lock_order.py drives
-- that interleaving.
--
-- cpa.todo_complete_claim_v2 takes the order:
--   1. the completed ToDos' job rows, in id order (private.todo_jobs_lock_v1), before any ToDo;
--   2. the completions and the release of their dependents (ToDo rows of jobs it holds: any
--      other writer of them waits at the job row first, so these waits cannot close a cycle);
--   3. the claim (private.todo_claim_pick_v1: SKIP LOCKED, waits for no row);
--   4. the claimed ToDos' pending jobs start with SKIP LOCKED, as cpa.todo_claim_v3 does (a
--      job locked elsewhere is started by a later claim; the call's own locks do not skip);
--   5. the counts on the completed ToDos' jobs, already locked in step 1.
-- Nothing waits after the claim's tenant lock but the flush at commit, which takes only its
-- sorted advisory locks. v1 stays for code of the previous deploy.
--
-- private.job_events_flush_v3 (20261128000300) runs with plan_cache_mode = force_generic_plan,
-- as 20261128000100_submit_fast set for _v2: the flush otherwise plans its statements again at
-- every commit.

create function cpa.todo_complete_claim_v2(
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
           status = case when j.status = 'running' and j.todos_done + n.k >= j.todo_count then 'done'
                         else j.status end,
           completed_at = case when j.status = 'running' and j.todos_done + n.k >= j.todo_count
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
comment on function cpa.todo_complete_claim_v2 is 'Complete a finished batch (releasing dependents), then claim the next one (as todo_claim_v3), then count the done ToDos on their jobs: one transaction, one events flush, in the lock order of 20261128000200 (the completed ToDos'' jobs first). Rows: (done, claimed ToDo or null).';
revoke execute on function
  cpa.todo_complete_claim_v2(jsonb, text, text, integer, double precision, uuid, text[], integer)
  from public, anon, authenticated;
grant execute on function
  cpa.todo_complete_claim_v2(jsonb, text, text, integer, double precision, uuid, text[], integer)
  to service_role;

alter function private.job_events_flush_v3() set plan_cache_mode = 'force_generic_plan';
