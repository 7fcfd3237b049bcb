-- job_events keeps only the indexes its readers use (issue 15).
--
-- Every progress event is a heap row plus one entry in each of the log's indexes, and a
-- 10,000-ToDo drain writes 20,000 events. Of the four indexes, two serve the readers:
--   job_events_pkey (id)               the ids, and the events' order;
--   job_events_job_id_idx (job_id, id) SSE and GET .../events (one job, after Last-Event-ID),
--                                      and deleting a job's events (jobs_delete_events).
-- The other two served no query on the hot path:
--   job_events_tenant_id_idx (tenant_id): no query of the API, the dispatcher or the triggers
--     reads events by tenant; a tenant's events go with its jobs (by job_id). The RLS policy
--     filters by tenant, but every API read also names the job.
--   job_events_created_idx (created_at, btree): only retention_prune_v1's "older than N days".
--     Events are appended in time order, so a BRIN index answers that range for a few pages
--     per 128 heap pages instead of a btree entry per row.
-- Measured (bench: the same drain with and without, 5 interleaved pairs, twice): 1 x 10,000
-- ×1.02–1.08, chains ×1.03–1.05.

drop index if exists public.job_events_tenant_id_idx;
drop index if exists public.job_events_created_idx;
create index job_events_created_brin on public.job_events using brin (created_at);
comment on index public.job_events_created_brin is 'Retention''s time range (cpa.retention_prune_v1): events are appended in time order, so BRIN, not a btree entry per event.';
