-- The progress event contract (docs/events.schema.json), on the Realtime side.
-- An event reads the same on both channels: SSE `data:` and each item of the broadcast payload
-- {"events": [...]} on topic 'tenant:<tenant_id>'. The broadcast so far lacked `created_at`;
-- it now sends the same fields as the API. Large statements (a batch claim of hundreds of
-- ToDos, big results) are split into several messages so none exceeds Realtime's payload limit
-- (256 KB on the Free plan); every item keeps its id, and a client orders by it.

create or replace function private.job_events_broadcast_v1()
returns trigger
language plpgsql security definer set search_path = ''
as $$
declare
  v record;
begin
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

-- Realtime authorizes a private channel by selecting probe rows of the channel's topic with
-- realtime.topic() set to it. Checking the row's own topic as well means a member of one tenant
-- who selects realtime.messages (or asks Broadcast Replay) never sees another tenant's rows,
-- whatever topic the session claims.
drop policy if exists "Tenant members can receive their tenant's broadcasts" on realtime.messages;
create policy "Tenant members can receive their own tenant's broadcasts"
  on realtime.messages for select to authenticated
  using (
    realtime.messages.extension = 'broadcast'
    and realtime.messages.topic = (select realtime.topic())
    and realtime.messages.topic like 'tenant:%'
    and split_part(realtime.messages.topic, ':', 2) in (
      select t::text from private.user_tenant_ids_v1() as t
    )
  );
