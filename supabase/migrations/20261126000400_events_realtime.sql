-- Progress events and Realtime.
-- Status changes of jobs and ToDos are appended to job_events by statement-level triggers
-- (transition tables: one insert per statement, however many rows a batch claim touched).
-- New events are broadcast to the tenant-private topic 'tenant:<tenant_id>' with
-- realtime.send (Supabase's recommended "Broadcast from Database"), one message per tenant per
-- statement. ToDos that become ready NOTIFY 'cpa_todo_ready' for local dispatcher wake-ups.

-- ToDo status changes -------------------------------------------------------------------------
create function private.todos_events_v1()
returns trigger
language plpgsql security definer set search_path = ''
as $$
begin
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

create trigger todos_events_insert
  after insert on public.todos
  referencing new table as new_rows
  for each statement execute function private.todos_events_v1();
create trigger todos_events_update
  after update on public.todos
  referencing old table as old_rows new table as new_rows
  for each statement execute function private.todos_events_v1();

-- Job status changes --------------------------------------------------------------------------
create function private.jobs_events_v1()
returns trigger
language plpgsql security definer set search_path = ''
as $$
begin
  if tg_op = 'INSERT' then
    insert into public.job_events (tenant_id, job_id, kind, status, data)
    select n.tenant_id, n.id, 'job.status', n.status, jsonb_build_object('intent', n.intent)
    from new_rows n order by n.id;
  else
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

create trigger jobs_events_insert
  after insert on public.jobs
  referencing new table as new_rows
  for each statement execute function private.jobs_events_v1();
create trigger jobs_events_update
  after update on public.jobs
  referencing old table as old_rows new table as new_rows
  for each statement execute function private.jobs_events_v1();

-- Realtime broadcast --------------------------------------------------------------------------
create function private.job_events_broadcast_v1()
returns trigger
language plpgsql security definer set search_path = ''
as $$
declare
  v record;
begin
  for v in
    select e.tenant_id,
           jsonb_agg(jsonb_build_object('id', e.id, 'job_id', e.job_id, 'todo_id', e.todo_id,
                                        'kind', e.kind, 'status', e.status, 'data', e.data)
                     order by e.id) as events
    from new_rows e
    group by e.tenant_id
  loop
    perform realtime.send(jsonb_build_object('events', v.events), 'job_events',
                          'tenant:' || v.tenant_id::text, true);
  end loop;
  return null;
end;
$$;
revoke execute on function private.job_events_broadcast_v1() from public;

create trigger job_events_broadcast
  after insert on public.job_events
  referencing new table as new_rows
  for each statement execute function private.job_events_broadcast_v1();

-- Only members may subscribe to (read) their tenant's private topic; nobody may write to it
-- from a client (no insert policy).
create policy "Tenant members can receive their tenant's broadcasts"
  on realtime.messages for select to authenticated
  using (
    realtime.messages.extension = 'broadcast'
    and (select realtime.topic()) like 'tenant:%'
    and split_part((select realtime.topic()), ':', 2) in (
      select t::text from private.user_tenant_ids_v1() as t
    )
  );
