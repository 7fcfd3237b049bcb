-- Progress events: no per-row foreign-key check (issue 15).
-- job_events.job_id referenced jobs(id) on delete cascade. Every event row therefore ran the
-- RI check (an index probe plus FOR KEY SHARE on the job row): 20,000 checks per 10,000-ToDo
-- drain, ~180 ms of it. Every writer takes the job id from a row it has just changed or read
-- (the status triggers from the jobs/todos row itself; the note, notice and append paths from
-- the ToDo), so the check never caught anything. What the cascade gave, deleting a job's
-- events with the job (and with its tenant, through jobs' own cascade), is kept by one
-- statement-level trigger: a set-based delete per statement instead of per row.

alter table public.job_events drop constraint job_events_job_id_fkey;
comment on column public.job_events.job_id is 'The job (no foreign key: writers take it from the job or ToDo row they change; events are deleted with their job by the jobs_delete_events trigger).';

create function private.jobs_delete_events_v1()
returns trigger
language plpgsql security definer set search_path = ''
as $$
begin
  delete from public.job_events e using old_rows o where e.job_id = o.id;
  return null;
end;
$$;
revoke execute on function private.jobs_delete_events_v1() from public;

create trigger jobs_delete_events
  after delete on public.jobs
  referencing old table as old_rows
  for each statement execute function private.jobs_delete_events_v1();
