-- Named queries of the data layer. Each block starts with "-- name: <noun>_<verb>".
-- Parameters are psycopg placeholders; nothing here is built with string formatting.

-- name: session_user_scope
-- Impersonate an end user for this transaction, as PostgREST does. Request work runs with
-- statement_timeout = CPA_DB_TIMEOUT. cpa.lost_lease_limit is CPA_LOST_LEASE_LIMIT for the
-- lease expiry every claim runs (private.lost_lease_limit_v1).
select set_config('role', 'authenticated', true),
       set_config('request.jwt.claims', %(claims)s, true),
       set_config('statement_timeout', %(statement_timeout)s, true),
       set_config('cpa.lost_lease_limit', %(lost_lease_limit)s, true);

-- name: session_service_scope
select set_config('role', 'service_role', true),
       set_config('cpa.lost_lease_limit', %(lost_lease_limit)s, true);

-- name: job_create
-- The job queries select the columns of store.JobRow, which their rows are built as.
select id, tenant_id, created_by, request, intent, status, priority, idempotency_key, todo_count,
       todos_done, created_at, started_at, completed_at, error, retry_count, max_retries, run_at,
       time_zone, schedule_id, scheduled_for, traceparent
  from cpa.job_create_v2(%(tenant_id)s, %(request)s, %(intent)s, %(todos)s::jsonb,
                         %(idempotency_key)s, %(priority)s, %(max_retries)s,
                         %(run_at)s::timestamptz, %(time_zone)s);

-- name: job_submit
-- POST /v1/jobs in one call; the answer is the job as JSON text, passed to the client as is.
-- v3 writes the new job's events and broadcast itself (no commit-time flush for them).
select cpa.job_submit_v3(%(tenant_id)s, %(request)s, %(intent)s, %(todos)s::jsonb,
                         %(idempotency_key)s, %(priority)s, %(max_retries)s,
                         %(run_at)s::timestamptz, %(time_zone)s, %(traceparent)s,
                         %(rate_limit)s, %(rate_window)s)::text as job;

-- name: job_submit_as
-- job_submit with the claims of session_user_scope in the same statement (Store.submit): the
-- function sets them, then calls cpa.job_submit_v3 as authenticated. Owner only.
select private.job_submit_as_v1(%(claims)s, %(tenant_id)s, %(request)s, %(intent)s,
                            %(todos)s::jsonb, %(idempotency_key)s, %(priority)s,
                            %(max_retries)s, %(run_at)s::timestamptz, %(time_zone)s,
                            %(traceparent)s, %(rate_limit)s, %(rate_window)s) as job;

-- name: job_get
select id, tenant_id, created_by, request, intent, status, priority, idempotency_key, todo_count,
       todos_done, created_at, started_at, completed_at, error, retry_count, max_retries, run_at,
       time_zone, schedule_id, scheduled_for, traceparent
  from public.jobs where id = %(job_id)s;

-- name: job_list
-- Keyset pagination, newest first; the cursor is the (created_at, id) of the last row seen.
select id, tenant_id, created_by, request, intent, status, priority, idempotency_key, todo_count,
       todos_done, created_at, started_at, completed_at, error, retry_count, max_retries, run_at,
       time_zone, schedule_id, scheduled_for, traceparent
  from public.jobs
 where (%(tenant_id)s::uuid is null or tenant_id = %(tenant_id)s::uuid)
   and (%(status)s::text is null or status = %(status)s::text)
   and (%(before_created)s::timestamptz is null
        or (created_at, id) < (%(before_created)s::timestamptz, %(before_id)s::uuid))
 order by created_at desc, id desc
 limit %(limit)s;

-- name: task_list
-- A2A ListTasks: job_list's keyset page, optionally of one conversation (the prefix of the
-- idempotency key, a2a_tasks.idempotency_key) and changed since a time.
select id, tenant_id, created_by, request, intent, status, priority, idempotency_key, todo_count,
       todos_done, created_at, started_at, completed_at, error, retry_count, max_retries, run_at,
       time_zone, schedule_id, scheduled_for, traceparent
  from public.jobs
 where tenant_id = %(tenant_id)s::uuid
   and (%(status)s::text is null or status = %(status)s::text)
   and (%(key_prefix)s::text is null or starts_with(idempotency_key, %(key_prefix)s::text))
   and (%(changed_after)s::timestamptz is null
        or coalesce(completed_at, started_at, created_at) > %(changed_after)s::timestamptz)
   and (%(before_created)s::timestamptz is null
        or (created_at, id) < (%(before_created)s::timestamptz, %(before_id)s::uuid))
 order by created_at desc, id desc
 limit %(limit)s;

-- name: task_count
select count(*) as total
  from public.jobs
 where tenant_id = %(tenant_id)s::uuid
   and (%(status)s::text is null or status = %(status)s::text)
   and (%(key_prefix)s::text is null or starts_with(idempotency_key, %(key_prefix)s::text))
   and (%(changed_after)s::timestamptz is null
        or coalesce(completed_at, started_at, created_at) > %(changed_after)s::timestamptz);

-- name: job_todos
select t.*,
       coalesce((select array_agg(p.key order by p.key)
                   from public.todo_edges e join public.todos p on p.id = e.depends_on_id
                  where e.todo_id = t.id), '{}') as depends_on
  from public.todos t
 where t.job_id = %(job_id)s
 order by t.position;

-- name: job_cancel
select id, tenant_id, created_by, request, intent, status, priority, idempotency_key, todo_count,
       todos_done, created_at, started_at, completed_at, error, retry_count, max_retries, run_at,
       time_zone, schedule_id, scheduled_for, traceparent
  from cpa.job_cancel_v2(%(job_id)s);

-- name: job_retry
select id, tenant_id, created_by, request, intent, status, priority, idempotency_key, todo_count,
       todos_done, created_at, started_at, completed_at, error, retry_count, max_retries, run_at,
       time_zone, schedule_id, scheduled_for, traceparent
  from cpa.job_retry_v3(%(job_id)s);

-- name: job_gate
-- A transaction that calls several operations (the dispatcher's report) takes all its jobs'
-- gates first, exclusive where any operation needs it: the lock order of migration
-- 20261128000600_job_gate (gates, then ToDo rows, then job rows).
select cpa.job_gate_v1(%(exclusive)s::uuid[], %(shared)s::uuid[]) as n;

-- name: todo_get
select * from public.todos where id = %(todo_id)s;

-- name: todo_claim
-- The columns of store.TodoRow, which the rows are built as.
select id, job_id, tenant_id, key, action, params, attempts, max_attempts, timer_until,
       lease_expires_at, error, lost_leases
  from cpa.todo_claim_v3(%(target)s, %(owner)s, %(limit)s, %(lease_seconds)s,
                         %(tenant_id)s, %(actions)s, %(tenant_cap)s);

-- name: todo_complete_claim
-- done (ToDos completed by the call), then the columns of store.TodoRow (null when nothing was
-- claimed: the call's single row).
select c.done, (c.todo).id, (c.todo).job_id, (c.todo).tenant_id, (c.todo).key, (c.todo).action,
       (c.todo).params, (c.todo).attempts, (c.todo).max_attempts, (c.todo).timer_until,
       (c.todo).lease_expires_at, (c.todo).error, (c.todo).lost_leases
  from cpa.todo_complete_claim_v4(%(items)s::jsonb, %(target)s, %(owner)s, %(limit)s,
                                  %(lease_seconds)s, %(tenant_id)s, %(actions)s,
                                  %(tenant_cap)s) c;

-- name: todo_complete
select cpa.todo_complete_v4(%(items)s::jsonb) as n;

-- name: todo_fail
select cpa.todo_fail_v2(%(items)s::jsonb, %(backoff_base)s) as n;

-- name: lock_timeout_set
-- Set this transaction's lock_timeout and answer the value it had (read first, in the
-- subquery), so that the caller can put it back.
select p.previous, set_config('lock_timeout', %(value)s, true) as value
  from (select current_setting('lock_timeout') as previous offset 0) p;

-- name: todo_release
select cpa.todo_release_v2(%(items)s::jsonb, %(refusal)s, %(max_refusals)s) as n;

-- name: todo_snooze
select cpa.todo_snooze_v1(%(todo_id)s, %(owner)s, %(until)s) as ok;

-- name: todo_extend
select cpa.todo_extend_v2(%(ids)s, %(owner)s, %(lease_seconds)s) as n;

-- name: todo_held
-- Which of these running ToDos (id, attempt) are still leased to this owner: a cancelled job's
-- ToDos, and leases lost to another worker, are not.
select t.id
  from unnest(%(ids)s::uuid[], %(attempts)s::integer[]) as h(id, attempt)
  join public.todos t on t.id = h.id
 where t.status = 'running' and t.lease_owner = %(owner)s and t.attempts = h.attempt;

-- name: todo_confirm
select * from cpa.todo_confirm_v2(%(todo_id)s, %(approved)s);

-- name: todo_job_results
select key, result from public.todos where job_id = %(job_id)s and status = 'done';

-- name: agent_upsert
select * from cpa.agent_upsert_v1(%(tenant_id)s, %(agent_key)s, %(name)s, %(actions)s);

-- name: agent_claim
select * from cpa.agent_claim_v2(%(tenant_id)s, %(agent_key)s, %(actions)s, %(limit)s,
                                 %(lease_seconds)s);

-- name: agent_list
-- GET /v1/agents: row-level security keeps a member's own agents (owners and admins: all).
select a.agent_key as agent_id, a.name, a.actions, a.last_seen_at, a.created_by,
       a.last_seen_at > now() - make_interval(secs => %(seen_seconds)s) as online
  from public.agents a
 where a.tenant_id = %(tenant_id)s
 order by a.agent_key;

-- name: agent_complete
-- An agent's reports on the ToDos it holds (complete, fail, release): the database derives the
-- lease owner from the agent key (private.agent_owner_v1); the items carry no owner.
select cpa.agent_complete_v1(%(agent_key)s, %(items)s::jsonb) as n;

-- name: agent_fail
select cpa.agent_fail_v1(%(agent_key)s, %(items)s::jsonb, %(backoff_base)s) as n;

-- name: agent_release
select cpa.agent_release_v1(%(agent_key)s, %(items)s::jsonb, %(refusal)s, %(max_refusals)s) as n;

-- name: event_list
-- job_events is partitioned by day: a job's events are no older than the job, so the bound on
-- created_at (an initplan) lets the executor skip the partitions before it.
select * from public.job_events
 where job_id = %(job_id)s and id > %(after_id)s
   and created_at >= (select j.created_at from public.jobs j where j.id = %(job_id)s)
 order by id
 limit %(limit)s;

-- name: event_last
select coalesce(max(id), 0) as last from public.job_events where job_id = %(job_id)s;

-- name: event_append
insert into public.job_events (tenant_id, job_id, todo_id, kind, status, data)
values (%(tenant_id)s, %(job_id)s, %(todo_id)s, %(kind)s, %(status)s, %(data)s::jsonb)
returning id;

-- name: tenant_ensure
insert into public.tenants (id, name) values (%(tenant_id)s, %(name)s)
on conflict (id) do nothing;

-- name: user_ensure
insert into auth.users (id, email) values (%(user_id)s, %(email)s)
on conflict (id) do nothing;

-- name: membership_ensure
insert into public.memberships (tenant_id, user_id, role) values (%(tenant_id)s, %(user_id)s, %(role)s)
on conflict (tenant_id, user_id) do nothing;

-- name: tenant_other_members
-- Whether anyone else is already a member (cpa-scheduler token: the first one is the owner).
select exists (
  select 1 from public.memberships m where m.tenant_id = %(tenant_id)s and m.user_id <> %(user_id)s
) as others;

-- name: tenant_of_user
select tenant_id from public.memberships where user_id = %(user_id)s order by created_at limit 1;

-- name: todo_note
select cpa.todo_note_v1(%(todo_id)s, %(kind)s, %(data)s::jsonb) as id;

-- name: rate_limit_hit
select * from cpa.rate_limit_hit_v1(%(tenant_id)s, %(limit)s, %(window_seconds)s);

-- name: membership_mine
select tenant_id from public.memberships where user_id = (select auth.uid()) order by created_at, tenant_id;

-- name: job_attach
select cpa.job_attach_v1(%(job_id)s, %(todos)s::jsonb) as n;

-- name: plan_cache_get
select cpa.plan_cache_get_v1(%(tenant_id)s, %(key)s) as plan;

-- name: plan_cache_put
select cpa.plan_cache_put_v1(%(tenant_id)s, %(key)s, %(plan)s::jsonb, %(ttl)s);

-- name: job_route
select cpa.job_route_v2(%(job_id)s, %(agent_key)s) as n;

-- name: job_trace_set
select cpa.job_trace_v1(%(job_id)s, %(traceparent)s) as ok;

-- name: job_traces
-- The stored trace context of these jobs (only traced ones), for dispatcher and agent spans.
select id, traceparent from public.jobs
 where id = any(%(ids)s::uuid[]) and traceparent is not null;

-- name: metrics_snapshot
-- Gauges computed when /metrics is scraped, so they hold for serverless dispatchers too.
-- A ToDo counts as ready once it is claimable (status ready and its run_after has passed);
-- it has been waiting since the later of run_after and its last status change.
with ready as (
  select t.target, count(*) as n,
         coalesce(extract(epoch from now() - min(greatest(t.run_after, t.updated_at))), 0) as age
    from public.todos t
   where t.status = 'ready' and t.run_after <= now()
   group by t.target
), running as (
  select t.target, count(*) as n,
         count(*) filter (where t.lease_expires_at < now()) as expired
    from public.todos t
   where t.status = 'running'
   group by t.target
), targets(target) as (values ('cloud'), ('desktop'))
select 'todo' as kind, g.target as label,
       coalesce(r.n, 0)::double precision as ready,
       coalesce(r.age, 0)::double precision as oldest_ready_age,
       coalesce(u.n, 0)::double precision as running,
       coalesce(u.expired, 0)::double precision as lease_expired,
       (select count(*) from public.todos w
         where w.status = 'confirming' and w.target = g.target)::double precision as confirming
  from targets g
  left join ready r on r.target = g.target
  left join running u on u.target = g.target
union all
select 'job', s.status, count(j.id)::double precision, 0, 0, 0, 0
  from (values ('pending'), ('running'), ('done'), ('failed'), ('cancelled')) as s(status)
  left join public.jobs j on j.status = s.status
 group by s.status;

-- name: metrics_top_tenants
-- Opt-in (CPA_METRICS_TOP_TENANTS): ready ToDos of the N tenants with the most of them.
select t.tenant_id, t.target, count(*)::double precision as ready
  from public.todos t
 where t.status = 'ready' and t.run_after <= now()
 group by t.tenant_id, t.target
 order by count(*) desc
 limit %(limit)s;

-- name: todo_next_due
-- When the next ready ToDo of a target comes due, for the long-running dispatcher's alarm.
select least(
  (select min(t.run_after) from public.todos t
    where t.status = 'ready' and t.target = %(target)s and t.run_after > now()),
  (select min(s.next_run_at) from public.schedules s where not s.paused and s.next_run_at > now())
) as due;

-- name: desktop_sweep
select cpa.desktop_sweep_v3(%(seen_seconds)s) as n;

-- name: agent_offering
-- Whether an agent offering the action was seen recently: the caller's own (their desktop
-- ToDos go only to them); any of the tenant's for the service role.
select exists (
  select 1 from public.agents a
   where a.tenant_id = %(tenant_id)s and %(action)s = any(a.actions)
     and (a.created_by = (select auth.uid()) or (select auth.uid()) is null)
     and a.last_seen_at > now() - make_interval(secs => %(seen_seconds)s)
) as online;

-- name: schedule_create
select * from cpa.schedule_create_v2(%(tenant_id)s, %(cron)s, %(time_zone)s, %(request)s,
                                     %(graph)s::jsonb, %(intent)s, %(todos)s::jsonb,
                                     %(next_run_at)s, %(cap)s);

-- name: schedule_get
select * from public.schedules where id = %(schedule_id)s;

-- name: schedule_list
select * from public.schedules
 where tenant_id = %(tenant_id)s
 order by created_at desc, id desc
 limit %(limit)s;

-- name: schedule_pause
select * from cpa.schedule_pause_v2(%(schedule_id)s, %(paused)s, %(next_run_at)s, %(cap)s);

-- name: schedule_delete
select cpa.schedule_delete_v1(%(schedule_id)s) as ok;

-- name: schedule_due
-- Due schedules, each claimed by one dispatcher pass: the others skip the locked rows.
select * from public.schedules
 where not paused and next_run_at <= %(now)s
 order by next_run_at
 limit %(limit)s
 for no key update skip locked;

-- name: schedule_fire
select id, tenant_id, created_by, request, intent, status, priority, idempotency_key, todo_count,
       todos_done, created_at, started_at, completed_at, error, retry_count, max_retries, run_at,
       time_zone, schedule_id, scheduled_for, traceparent
  from cpa.schedule_fire_v2(%(schedule_id)s, %(occurrence)s, %(next_run_at)s, %(budget)s);

-- name: job_by_idempotency_key
select id, tenant_id, created_by, request, intent, status, priority, idempotency_key, todo_count,
       todos_done, created_at, started_at, completed_at, error, retry_count, max_retries, run_at,
       time_zone, schedule_id, scheduled_for, traceparent
  from public.jobs where tenant_id = %(tenant_id)s and idempotency_key = %(key)s;


-- name: catalogue_sync
-- The shipped actions.yaml into the table the database checks ToDo inserts against.
insert into private.catalogue_actions (name, target, requires_confirmation, params_schema)
select a.name, a.target, a.requires_confirmation, a.params_schema
  from jsonb_to_recordset(%(actions)s::jsonb)
       as a(name text, target text, requires_confirmation boolean, params_schema jsonb)
on conflict (name) do update
   set target = excluded.target, requires_confirmation = excluded.requires_confirmation,
       params_schema = excluded.params_schema, updated_at = now()
 where (private.catalogue_actions.target, private.catalogue_actions.requires_confirmation,
        private.catalogue_actions.params_schema)
       is distinct from (excluded.target, excluded.requires_confirmation, excluded.params_schema);

-- name: idempotency_check
select cpa.idempotency_check_v1(%(tenant_id)s, %(key)s, %(body_hash)s) as new;

-- name: todo_lease_owners
select owner from cpa.todo_lease_owners_v1(%(prefix)s) as owner;

-- name: todo_reclaim_dead
select cpa.todo_reclaim_dead_v1(%(owners)s) as n;

-- name: retention_prune
select cpa.retention_prune_v1(%(job_days)s, %(audit_days)s, %(batch)s) as pruned;

-- name: membership_mine_named
select m.tenant_id, t.name, m.role
from public.memberships m join public.tenants t on t.id = m.tenant_id
where m.user_id = (select auth.uid())
order by m.created_at, m.tenant_id;
