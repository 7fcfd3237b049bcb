-- The agent lease owner is defined once, here. A desktop agent holds its ToDos under the lease
-- owner 'agent:<agent key>'; agent_claim_v1 built that string in SQL and the API rebuilt it in
-- Python to complete, fail or release them, so the two had to agree by hand.
-- private.agent_owner_v1 is now the one place that spells it. The agent-facing operations take
-- the agent key instead of an owner and derive the owner with it:
--   cpa.agent_claim_v2    agent_claim_v1 on cpa.todo_claim_v2 (no tenant cap: the same claim);
--   cpa.agent_complete_v1, cpa.agent_fail_v1, cpa.agent_release_v1
--                         each item's owner becomes the agent's (whatever the caller sent), then
--                         cpa.todo_complete_v1, _fail_v1, _release_v1 run unchanged, so the
--                         fence (exact owner, attempt) and the end-user rule (only agent owners,
--                         desktop ToDos of one's tenants) stay where they are.
-- The functions of earlier migrations keep their own spelling (append-only): todo_claim_v1/v2
-- match a pinned agent as 'agent:' || assigned_agent, and complete, fail and release let end
-- users act only as owners like 'agent:%'. tests/integration/test_agent_owner.py pins that the
-- owner made here satisfies both. agent_claim_v1 stays for code still calling it during a deploy.

-- The lease owner of an agent's ToDos.
create function private.agent_owner_v1(p_agent_key text)
returns text
language sql immutable parallel safe set search_path = ''
as $$
  select 'agent:' || p_agent_key
$$;
comment on function private.agent_owner_v1 is 'The lease owner of a desktop agent''s ToDos: agent:<agent key>. The only place that spells it.';
revoke execute on function private.agent_owner_v1(text) from public, anon, authenticated, service_role;

-- p_items with each item's owner set to the agent's (an owner the caller sent is replaced).
create function private.agent_items_v1(p_agent_key text, p_items jsonb)
returns jsonb
language sql immutable parallel safe set search_path = ''
as $$
  select coalesce(jsonb_agg(i.item || jsonb_build_object('owner', private.agent_owner_v1(p_agent_key))
                            order by i.n), '[]'::jsonb)
    from jsonb_array_elements(p_items) with ordinality as i(item, n)
$$;
comment on function private.agent_items_v1 is 'Report items with the agent''s lease owner (private.agent_owner_v1) as each item''s owner.';
revoke execute on function private.agent_items_v1(text, jsonb) from public, anon, authenticated, service_role;

-- claim ----------------------------------------------------------------------------------------
create function cpa.agent_claim_v2(
  p_tenant_id uuid, p_agent_key text, p_actions text[], p_limit integer,
  p_lease_seconds double precision default 300
) returns setof public.todos
language plpgsql security definer set search_path = ''
as $$
begin
  perform private.tenant_authorize_v1(p_tenant_id);
  insert into public.agents (tenant_id, agent_key, actions, created_by)
  values (p_tenant_id, p_agent_key, coalesce(p_actions, '{}'), (select auth.uid()))
  on conflict (tenant_id, agent_key) do update set last_seen_at = now();
  return query
  select * from cpa.todo_claim_v2('desktop', private.agent_owner_v1(p_agent_key), least(p_limit, 50),
                                  least(greatest(p_lease_seconds, 5), 3600), p_tenant_id, p_actions);
end;
$$;
comment on function cpa.agent_claim_v2 is 'A desktop agent claims its tenant''s ready desktop ToDos for the actions it offers, leased to private.agent_owner_v1(p_agent_key).';
revoke execute on function cpa.agent_claim_v2(uuid, text, text[], integer, double precision) from public, anon;
grant execute on function cpa.agent_claim_v2(uuid, text, text[], integer, double precision) to authenticated, service_role;

-- reports --------------------------------------------------------------------------------------
-- p_items: [{"id", "attempt"?, "result"}]
create function cpa.agent_complete_v1(p_agent_key text, p_items jsonb)
returns integer
language sql security definer set search_path = ''
as $$
  select cpa.todo_complete_v1(private.agent_items_v1(p_agent_key, p_items))
$$;
comment on function cpa.agent_complete_v1 is 'cpa.todo_complete_v1 for the ToDos the agent holds (owner private.agent_owner_v1(p_agent_key)).';
revoke execute on function cpa.agent_complete_v1(text, jsonb) from public, anon;
grant execute on function cpa.agent_complete_v1(text, jsonb) to authenticated, service_role;

-- p_items: [{"id", "attempt"?, "error", "retryable"}]
create function cpa.agent_fail_v1(
  p_agent_key text, p_items jsonb, p_backoff_base double precision default 1.0
) returns integer
language sql security definer set search_path = ''
as $$
  select cpa.todo_fail_v1(private.agent_items_v1(p_agent_key, p_items), p_backoff_base)
$$;
comment on function cpa.agent_fail_v1 is 'cpa.todo_fail_v1 for the ToDos the agent holds (owner private.agent_owner_v1(p_agent_key)).';
revoke execute on function cpa.agent_fail_v1(text, jsonb, double precision) from public, anon;
grant execute on function cpa.agent_fail_v1(text, jsonb, double precision) to authenticated, service_role;

-- p_items: [{"id"}]; a refusal counts toward p_max_refusals.
create function cpa.agent_release_v1(
  p_agent_key text, p_items jsonb, p_refusal boolean default false, p_max_refusals integer default 3
) returns integer
language sql security definer set search_path = ''
as $$
  select cpa.todo_release_v1(private.agent_items_v1(p_agent_key, p_items), p_refusal, p_max_refusals)
$$;
comment on function cpa.agent_release_v1 is 'cpa.todo_release_v1 for the ToDos the agent holds (owner private.agent_owner_v1(p_agent_key)).';
revoke execute on function cpa.agent_release_v1(text, jsonb, boolean, integer) from public, anon;
grant execute on function cpa.agent_release_v1(text, jsonb, boolean, integer) to authenticated, service_role;
