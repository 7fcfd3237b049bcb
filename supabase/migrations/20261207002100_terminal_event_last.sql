-- The job's terminal event comes last (issue 22, item 4).
--
-- Before. A cancel, and a terminal failure, ended the job and cancelled its unstarted ToDos,
-- but let its running ToDos finish: their final events (up to 64, up to 1.5 s later) came after
-- the job's 'cancelled' or 'failed' event. SSE closes at that event and a long-poll page says
-- done there, so every client missed them and showed those ToDos 'running' for good.
--
-- Now. A job ends with every ToDo final: the running ToDos of a job that is cancelled or fails
-- end 'cancelled' in the same transaction, in the statement before the job's own (the events
-- of a transaction get their ids in statement order, so the job's event is its last). The
-- worker or agent still running one learns it when it reports: its complete, fail, snooze or
-- lease extension names a ToDo that is no longer running and changes nothing (the lease fence);
-- its result is dropped and a side effect it had may already have happened (README, "Retries").
-- A retry runs such a ToDo again, as any other cancelled one.
--
-- Replaced in place, same signatures and lock order (the exclusive gate is held by every
-- caller, so no completion of the job runs beside; the running ToDos are locked with the
-- unstarted ones, in one pass by id, after the job row): private.job_cancel_inner_v2 (behind
-- cpa.job_cancel_v2 and _v1) and private.todo_fail_terminal_v2 (behind todo_fail, the lease
-- expiry, the desktop sweep, refusals and declined confirmations).

create or replace function private.job_cancel_inner_v2(p_job_id uuid)
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
  if v_job.status = 'cancelled' then
    return v_job;
  end if;
  if v_job.status in ('done', 'failed') then
    raise exception 'The job is already %; only pending or running jobs can be cancelled.', v_job.status
      using errcode = '55000';
  end if;
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
comment on function private.job_cancel_inner_v2 is 'Cancel a pending or running job: its unstarted and running ToDos end cancelled before the job does (the job''s event is its last). The caller holds the job''s gate; locks the job row, then its ToDos by id.';
revoke execute on function private.job_cancel_inner_v2(uuid) from public, anon, authenticated, service_role;

create or replace function private.todo_fail_terminal_v2(p_ids uuid[], p_errors text[])
returns integer
language plpgsql security definer set search_path = ''
as $$
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
comment on function private.todo_fail_terminal_v2 is 'Fail ToDos for good: their jobs fail, and the jobs'' unstarted and running ToDos end cancelled before the job does. Locks the jobs first, then the ToDos by id.';
revoke execute on function private.todo_fail_terminal_v2(uuid[], text[]) from public, anon, authenticated, service_role;
