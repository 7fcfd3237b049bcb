-- Progress events: no work for statements that change no status (issue 15).
-- Statement-level triggers fire for every statement, also when it touched no row: the lease
-- sweep at the start of every claim, a claim that found nothing, a release or a lease extension.
-- Each of those used to run an empty INSERT into job_events, which fired the broadcast trigger
-- in turn (one trigger call and one planned aggregate more per statement). A drain of
-- 10,000 ToDos ran the events trigger 631 times, mostly for nothing. Now each function returns
-- as soon as it knows there is nothing to log or to send. Same rows, same order, same payloads.

create or replace function private.todos_events_v1()
returns trigger
language plpgsql security definer set search_path = ''
as $$
begin
  if not exists (select 1 from new_rows) then
    return null;
  end if;
  if tg_op = 'INSERT' then
    insert into public.job_events (tenant_id, job_id, todo_id, kind, status, data)
    select n.tenant_id, n.job_id, n.id, 'todo.status', n.status,
           jsonb_build_object('key', n.key, 'action', n.action, 'target', n.target)
    from new_rows n order by n.id;
    if exists (select 1 from new_rows where status = 'ready') then
      perform pg_notify('cpa_todo_ready', 'insert');
    end if;
  else
    insert into public.job_events (tenant_id, job_id, todo_id, kind, status, data)
    select n.tenant_id, n.job_id, n.id, 'todo.status', n.status,
           jsonb_strip_nulls(jsonb_build_object(
             'key', n.key, 'action', n.action, 'target', n.target, 'attempts', n.attempts,
             'error', n.error,
             'result', case when n.status = 'done' then n.result end))
    from new_rows n join old_rows o on o.id = n.id
    where n.status is distinct from o.status
    order by n.id;
    if exists (select 1 from new_rows n join old_rows o on o.id = n.id
               where n.status = 'ready' and o.status is distinct from 'ready') then
      perform pg_notify('cpa_todo_ready', 'update');
    end if;
  end if;
  return null;
end;
$$;
revoke execute on function private.todos_events_v1() from public;

create or replace function private.jobs_events_v1()
returns trigger
language plpgsql security definer set search_path = ''
as $$
begin
  if not exists (select 1 from new_rows) then
    return null;
  end if;
  if tg_op = 'INSERT' then
    insert into public.job_events (tenant_id, job_id, kind, status, data)
    select n.tenant_id, n.id, 'job.status', n.status, jsonb_build_object('intent', n.intent)
    from new_rows n order by n.id;
  else
    -- A completion updates its job's todos_done on every flush; the status changes only at the
    -- end. Job statements touch a few rows, so checking first costs less than an empty insert
    -- (and its broadcast trigger call).
    if not exists (select 1 from new_rows n join old_rows o on o.id = n.id
                   where n.status is distinct from o.status) then
      return null;
    end if;
    insert into public.job_events (tenant_id, job_id, kind, status, data)
    select n.tenant_id, n.id, 'job.status', n.status,
           jsonb_strip_nulls(jsonb_build_object('error', n.error, 'todos_done', n.todos_done,
                                                'todo_count', n.todo_count))
    from new_rows n join old_rows o on o.id = n.id
    where n.status is distinct from o.status
    order by n.id;
  end if;
  return null;
end;
$$;
revoke execute on function private.jobs_events_v1() from public;

-- As in 20261127000300_events_contract.sql (item shape, chunks of 50), plus the early return:
-- an INSERT ... SELECT that selected nothing (a ToDo update that changed no status) still
-- fires this trigger.
create or replace function private.job_events_broadcast_v1()
returns trigger
language plpgsql security definer set search_path = ''
as $$
declare
  v record;
begin
  if not exists (select 1 from new_rows) then
    return null;
  end if;
  for v in
    select c.tenant_id, jsonb_agg(c.event order by c.id) as events
    from (
      select e.tenant_id, e.id,
             jsonb_build_object('id', e.id, 'job_id', e.job_id, 'todo_id', e.todo_id,
                                'kind', e.kind, 'status', e.status, 'data', e.data,
                                'created_at', e.created_at) as event,
             -- 50 events per message keeps status-only batches around 20 KB. A done ToDo
             -- carries its result, so one huge result can still make a message large.
             (row_number() over (partition by e.tenant_id order by e.id) - 1) / 50 as chunk
      from new_rows e
    ) c
    group by c.tenant_id, c.chunk
    order by c.tenant_id, c.chunk
  loop
    perform realtime.send(jsonb_build_object('events', v.events), 'job_events',
                          'tenant:' || v.tenant_id::text, true);
  end loop;
  return null;
end;
$$;
revoke execute on function private.job_events_broadcast_v1() from public;
