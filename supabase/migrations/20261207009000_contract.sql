-- Contract: drop the superseded SQL functions.
--
-- A deploy runs the migrations first, then the new code, so while it rolls out the previous
-- release's code still calls the database (supabase/README.md, "Versions and deploys"). A
-- function may go once neither this release's code nor the previous release's (e2715a4) calls
-- it, and no live function, trigger or policy does. The previous release's calls are listed in
-- tests/fixtures/calls_e2715a4.txt; tests/integration/test_sql_calls.py checks that each still
-- resolves, that every call in shared/cpa_scheduler/sql/queries.sql does, and that every
-- function a live function names exists.
--
-- Not dropped, though older than another version: functions a live one still calls
-- (cpa.job_create_v1 from _v2, cpa.job_submit_v1 for keyed requests, cpa.todo_claim_v2 from
-- the agent claim, the todo_complete_v1 / todo_fail_v1 / todo_release_v1 the agent reports
-- call, private.todo_expire_v1 and _v2 on the claim's path).

-- The agent reports call cpa.todo_complete_v1, which ran _v2, _v3 and then _v4; it now runs _v4
-- itself (same signature and meaning), so _v2 and _v3 have no caller left.
create or replace function cpa.todo_complete_v1(p_items jsonb)
returns integer
language sql
security definer
set search_path = ''
as $$
  select cpa.todo_complete_v4(p_items)
$$;
revoke execute on function cpa.todo_complete_v1(jsonb) from public, anon;
grant execute on function cpa.todo_complete_v1(jsonb) to authenticated, service_role;

-- Operations of earlier releases, replaced by the version named in queries.sql.
drop function if exists cpa.agent_claim_v1(uuid, text, text[], integer, double precision);
drop function if exists cpa.desktop_sweep_v1(double precision);
drop function if exists cpa.desktop_sweep_v2(double precision);
drop function if exists cpa.job_cancel_v1(uuid);
drop function if exists cpa.job_lock_v1(uuid[]);
drop function if exists cpa.job_retry_v1(uuid);
drop function if exists cpa.job_retry_v2(uuid);
drop function if exists cpa.job_route_v1(uuid, text);
drop function if exists cpa.job_submit_v2(uuid, text, text, jsonb, text, integer, integer,
  timestamp with time zone, text, text, integer, integer);
drop function if exists cpa.todo_claim_v1(text, text, integer, double precision, uuid, text[]);
drop function if exists cpa.todo_complete_claim_v1(jsonb, text, text, integer, double precision,
  uuid, text[], integer);
drop function if exists cpa.todo_complete_claim_v2(jsonb, text, text, integer, double precision,
  uuid, text[], integer);
drop function if exists cpa.todo_complete_claim_v3(jsonb, text, text, integer, double precision,
  uuid, text[], integer);
drop function if exists cpa.todo_complete_v2(jsonb);
drop function if exists cpa.todo_complete_v3(jsonb);
drop function if exists cpa.todo_confirm_v1(uuid, boolean);
drop function if exists cpa.todo_extend_v1(uuid[], text, double precision);

-- Internal helpers and trigger functions no trigger runs any more (the triggers moved to the
-- newer versions).
drop function if exists private.job_events_flush_v1();
drop function if exists private.job_events_flush_v2();
drop function if exists private.job_events_flush_v3();
drop function if exists private.job_events_restage_v1();
drop function if exists private.job_events_restage_v2();
drop function if exists private.jobs_events_v1();
drop function if exists private.todos_events_v1();
drop function if exists private.todos_check_insert_v1();
drop function if exists private.todo_edges_check_insert_v1();
drop function if exists private.todo_fail_terminal_v1(uuid[], text[]);
