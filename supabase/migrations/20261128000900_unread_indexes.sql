-- The hot tables keep only the indexes something reads (issue 15).
--
-- Every ToDo status change is a non-HOT update of its todos row (the partial indexes name
-- status), so it adds an entry to every index of todos; every progress event is a heap row
-- plus an entry in each index of job_events. A 10,000-ToDo drain makes ~20,000-30,000 of
-- each. Three indexes served no query:
--   todos_tenant_id_idx (tenant_id): no query of the API, the dispatcher, the agents or the SQL
--     functions reads ToDos by tenant alone; the claims read the partial ready/running
--     indexes, which lead with (target, tenant_id), and the API names the job or the ToDo.
--     A tenant's ToDos go with its jobs (by job_id).
--   todo_edges_tenant_id_idx (tenant_id): edges are read by todo_id (primary key) and
--     depends_on_id; written once per edge at job creation.
--   job_events_tenant_id_idx (tenant_id): events are read by job (job_id, id) for SSE and
--     GET .../events, and deleted with their job by job_id.
-- The RLS policies filter by tenant, but every API read also names the job or the ToDo; a
-- Data API read of a whole table filters rows it scans anyway.
-- job_events_created_idx (created_at, btree) served only retention_prune_v1's "older than N
-- days": events are appended in time order, so a BRIN index answers that range with a summary
-- per 128 heap pages instead of a btree entry per event.
--
-- Measured (the same drain with and without, interleaved pairs): job_events' two indexes
-- ×1.02–1.08 on 1 x 10,000 in two 5-pair runs and within noise in an 11-pair run; todos'
-- ×1.06 on 1 x 10,000 and ×1.02 on chains (7 pairs).

drop index if exists public.todos_tenant_id_idx;
drop index if exists public.todo_edges_tenant_id_idx;
drop index if exists public.job_events_tenant_id_idx;
drop index if exists public.job_events_created_idx;
create index job_events_created_brin on public.job_events using brin (created_at);
comment on index public.job_events_created_brin is 'Retention''s time range (cpa.retention_prune_v1): events are appended in time order, so BRIN, not a btree entry per event.';
