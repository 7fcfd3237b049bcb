-- Review of the merged issue-15 branches: fixes.
--
-- 1. A retried job with nothing left to run. job_cancel lets running ToDos finish; when they all
--    finish done, the job is still 'cancelled' with todos_done = todo_count. job_retry_v2 then
--    restarted nothing (no failed or cancelled ToDo) and set the job 'running': no completion
--    would ever come to finish it, so it stayed running for good (found by
--    tests/integration/test_review_stress.py; tests/integration/test_review_findings.py).
--    cpa.job_retry_v3 finishes such a job ('done') instead; v2 and v1 run the v3 body. Same
--    lock order as v2: the job row, then its ToDos by id.

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
                       when j.todos_done > 0 then 'running' else 'pending' end,
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
