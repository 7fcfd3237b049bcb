-- Observability: a job keeps the W3C trace context of the request that created it, so the
-- dispatcher (another process, minutes later) and desktop agents continue the same trace.

create schema if not exists cpa;
grant usage on schema cpa to authenticated, service_role;

alter table public.jobs
  add column traceparent text
    check (traceparent ~ '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$');
comment on column public.jobs.traceparent is 'W3C traceparent of the span that created the job (null: tracing was off). Dispatcher and agent spans are its children.';

-- Set in the transaction that creates the job, by a separate call, so job creation itself does
-- not change. The first trace wins: a repeated Idempotency-Key keeps the original trace.
create function cpa.job_trace_v1(p_job_id uuid, p_traceparent text)
returns boolean
language plpgsql security definer set search_path = ''
as $$
begin
  perform private.job_authorized_v1(p_job_id);
  update public.jobs j set traceparent = p_traceparent
   where j.id = p_job_id and j.traceparent is null;
  return found;
end;
$$;
comment on function cpa.job_trace_v1 is 'Store the trace context of the request that created a job (first one wins); the caller must be a member of the job''s tenant.';
revoke execute on function cpa.job_trace_v1(uuid, text) from public, anon;
grant execute on function cpa.job_trace_v1(uuid, text) to authenticated, service_role;
