-- Agent notes: a desktop agent's agree, inform and refuse messages are recorded in the job's
-- progress log (end users cannot insert into job_events directly).

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
