-- Agents: a desktop agent's agree, inform and refuse messages are recorded in the job's
-- progress log (end users cannot insert into job_events directly), and a routed request's
-- desktop ToDos can be pinned to one agent.

create function public.todo_note_v1(p_todo_id uuid, p_kind text, p_data jsonb)
returns bigint
language plpgsql security definer set search_path = ''
as $$
declare
  v_todo public.todos;
  v_id bigint;
begin
  select * into v_todo from public.todos t where t.id = p_todo_id;
  if not found then
    raise exception 'not found' using errcode = 'P0002', hint = 'No such ToDo.';
  end if;
  perform private.tenant_authorize_v1(v_todo.tenant_id);
  if p_kind not in ('agent.agree', 'agent.inform', 'agent.refuse', 'notification') then
    raise exception 'The note kind % is not one an agent may record.', p_kind using errcode = '22023';
  end if;
  insert into public.job_events (tenant_id, job_id, todo_id, kind, status, data)
  values (v_todo.tenant_id, v_todo.job_id, v_todo.id, p_kind, v_todo.status, coalesce(p_data, '{}'::jsonb))
  returning id into v_id;
  return v_id;
end;
$$;
comment on function public.todo_note_v1 is 'Record an agent''s agree, inform or refuse message on a ToDo in job_events.';

revoke execute on function public.todo_note_v1(uuid, text, jsonb) from public, anon;
grant execute on function public.todo_note_v1(uuid, text, jsonb) to authenticated, service_role;

-- Pin the job's unfinished desktop ToDos to one agent (the `route` message).
create function public.job_route_v1(p_job_id uuid, p_agent_key text)
returns integer
language plpgsql security definer set search_path = ''
as $$
declare
  v_job public.jobs;
  v_count integer;
begin
  v_job := private.job_authorized_v1(p_job_id);
  update public.todos t set assigned_agent = p_agent_key, updated_at = now()
   where t.job_id = p_job_id and t.target = 'desktop'
     and t.status in ('waiting', 'confirming', 'ready');
  get diagnostics v_count = row_count;
  return v_count;
end;
$$;
comment on function public.job_route_v1 is 'Route a job''s unstarted desktop ToDos to one agent of its tenant.';

revoke execute on function public.job_route_v1(uuid, text) from public, anon;
grant execute on function public.job_route_v1(uuid, text) to authenticated, service_role;
