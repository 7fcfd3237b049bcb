-- Events and Realtime: the append-only progress log and its broadcasts
--
-- `job_events` is append-only. Writers stage events in the transaction; one deferred
-- trigger flushes them at commit under per-bucket advisory locks taken in ascending
-- order, so the ids of one job become visible in id order (readers resume by id) and
-- flushes cannot deadlock. Each flush sends the broadcasts (`realtime.send`, private
-- topics: `tenant:<t>` for the tenant's owners and admins, `tenant:<t>:user:<u>` for the
-- jobs user u owns, `tenant:<t>:agents:<u>` for u's desktop wake-ups); the policies on
-- `realtime.messages` (`private.realtime_topic_allowed_v1`) let a member join only
-- their own topics and an owner or admin the tenant's.
--
-- Generated from supabase/migrations by scripts/schemas.py; edit a migration (and
-- the header in that script), then run `python scripts/schemas.py write`.

set check_function_bodies = false;

-- TYPE private.job_event_draft
CREATE TYPE private.job_event_draft AS (
	tenant_id uuid,
	job_id uuid,
	todo_id uuid,
	kind text,
	status text,
	data jsonb,
	created_at timestamp with time zone
);
-- COMMENT on TYPE private.job_event_draft
COMMENT ON TYPE private.job_event_draft IS 'An event staged in its transaction; it becomes a job_events row (with its id) at commit.';

-- FUNCTION cpa.todo_note_v1(uuid, text, jsonb)
CREATE FUNCTION cpa.todo_note_v1(p_todo_id uuid, p_kind text, p_data jsonb) RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    AS $$
declare
  v_todo public.todos;
  v_id bigint;
begin
  select * into v_todo from public.todos t where t.id = p_todo_id;
  if not found or not private.job_visible_v1(v_todo.job_id) then
    raise exception 'not found' using errcode = 'P0002', hint = 'It does not exist or is not visible to you.';
  end if;
  perform private.tenant_authorize_v1(v_todo.tenant_id);
  if p_kind not in ('agent.agree', 'agent.inform', 'agent.refuse', 'notification') then
    raise exception 'The note kind % is not one an agent may record.', p_kind using errcode = '22023';
  end if;
  if octet_length(p_data::text) > 65536 then
    raise exception 'A note holds at most 64 KiB of JSON; this one has % bytes.', octet_length(p_data::text)
      using errcode = '22023';
  end if;
  insert into public.job_events (tenant_id, job_id, todo_id, kind, status, data)
  values (v_todo.tenant_id, v_todo.job_id, v_todo.id, p_kind, v_todo.status, coalesce(p_data, '{}'::jsonb))
  returning id into v_id;
  return v_id;
end;
$$;
-- COMMENT on FUNCTION cpa.todo_note_v1(p_todo_id uuid, p_kind text, p_data jsonb)
COMMENT ON FUNCTION cpa.todo_note_v1(p_todo_id uuid, p_kind text, p_data jsonb) IS 'Record an agent''s note (agree, inform, refuse, notification) on a ToDo of a job the caller may read.';
-- ACL on FUNCTION cpa.todo_note_v1(p_todo_id uuid, p_kind text, p_data jsonb)
REVOKE ALL ON FUNCTION cpa.todo_note_v1(p_todo_id uuid, p_kind text, p_data jsonb) FROM PUBLIC;
GRANT ALL ON FUNCTION cpa.todo_note_v1(p_todo_id uuid, p_kind text, p_data jsonb) TO authenticated;
GRANT ALL ON FUNCTION cpa.todo_note_v1(p_todo_id uuid, p_kind text, p_data jsonb) TO service_role;

-- FUNCTION private.job_events_flush_v4()
CREATE FUNCTION private.job_events_flush_v4() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    SET plan_cache_mode TO 'force_generic_plan'
    AS $$
declare
  v_tx constant xid8 := pg_current_xact_id();
  v_jobs uuid[];
  v_gone uuid[];
  v_owned uuid[];
  v_owners uuid[];
  v_topics text[];
  v_payloads jsonb[];
begin
  delete from private.job_events_flush f where f.txid = v_tx;
  select array_agg(distinct u.job_id) into v_jobs
    from private.job_events_staged s cross join lateral unnest(s.events) u
   where s.txid = v_tx;
  if v_jobs is null then
    return null;
  end if;
  -- A job deleted in this transaction takes its staged events with it (as in _v2).
  -- Each job's owner (its user topic) in the same probe that finds deleted jobs.
  select array_agg(j.id) filter (where x.id is null),
         array_agg(j.id) filter (where x.created_by is not null),
         array_agg(x.created_by) filter (where x.created_by is not null)
    into v_gone, v_owned, v_owners
    from unnest(v_jobs) j(id) left join public.jobs x on x.id = j.id;
  -- One lock per bucket of jobs, in ascending order, at most 1024 (as in _v2).
  perform pg_advisory_xact_lock(7263200, b.key)
     from (select distinct hashtext(j.id::text) & 1023 as key
             from unnest(v_jobs) j(id)
            where v_gone is null or j.id <> all(v_gone)) b
    order by b.key;

  perform set_config('cpa.events_flushing', 'on', true);
  with gone as (
    delete from private.job_events_staged s where s.txid = v_tx returning s.seq, s.events
  ), ins as (
    insert into public.job_events (tenant_id, job_id, todo_id, kind, status, data, created_at)
    select e.tenant_id, e.job_id, e.todo_id, e.kind, e.status, coalesce(e.data, '{}'::jsonb),
           coalesce(e.created_at, now())
      from gone g
      cross join lateral unnest(g.events) with ordinality
           as e(tenant_id, job_id, todo_id, kind, status, data, created_at, ord)
     where v_gone is null or e.job_id <> all(v_gone)
     order by g.seq, e.ord
    returning *
  ), ev as (
    select i.tenant_id, i.id, o.user_id,
           jsonb_build_object('id', i.id, 'job_id', i.job_id, 'todo_id', i.todo_id,
                              'kind', i.kind, 'status', i.status, 'data', i.data,
                              'created_at', i.created_at) as event
      from ins i left join unnest(v_owned, v_owners) o(job_id, user_id) on o.job_id = i.job_id
  ), whole as (
    -- Each event goes to its tenant's topic and to its job owner's user topic: one pass over
    -- the events, aggregated per tenant and per (tenant, owner). Usually a topic's events fit
    -- one message: no per-event size and no window. Only a topic whose events pass 100 kB is
    -- cut by size, as in _v2 (an event starts a new message once the events before it reach
    -- another 100 kB).
    select 'tenant:' || e.tenant_id::text
           || case when grouping(e.user_id) = 0 then ':user:' || e.user_id::text else '' end
             as topic,
           jsonb_agg(e.event order by e.id) as events
      from ev e
     group by grouping sets ((e.tenant_id), (e.tenant_id, e.user_id))
    having grouping(e.user_id) = 1 or e.user_id is not null
  ), msg as (
    select w.topic, 0::bigint as chunk, w.events
      from whole w where pg_column_size(w.events) <= 100000
    union all
    select c.topic, c.chunk, jsonb_agg(c.event order by c.id)
    from (
      select t.topic, t.id, t.event,
             coalesce(sum(pg_column_size(t.event)) over (
               partition by t.topic order by t.id
               rows between unbounded preceding and 1 preceding), 0) / 100000 as chunk
      from (select d.topic, e.id, e.event
              from ev e
              cross join lateral (values ('tenant:' || e.tenant_id::text),
                                         ('tenant:' || e.tenant_id::text || ':user:'
                                          || e.user_id::text)) d(topic)
             -- A one-time filter: without a message over 100 kB nothing here runs.
             where exists (select 1 from whole w where pg_column_size(w.events) > 100000)
               and d.topic is not null) t
     where t.topic in (select w.topic from whole w where pg_column_size(w.events) > 100000)
    ) c
    group by c.topic, c.chunk
  )
  select array_agg(m.topic order by m.topic, m.chunk),
         array_agg(jsonb_build_object('events', m.events) order by m.topic, m.chunk)
    into v_topics, v_payloads
    from msg m;
  perform set_config('cpa.events_flushing', 'off', true);

  for i in 1 .. coalesce(cardinality(v_topics), 0) loop
    perform realtime.send(v_payloads[i], 'job_events', v_topics[i], true);
  end loop;
  return null;
end;
$$;
-- COMMENT on FUNCTION private.job_events_flush_v4()
COMMENT ON FUNCTION private.job_events_flush_v4() IS 'At commit: lock the transaction''s job buckets (advisory, sorted, at most 1024, in one statement), give its staged events their ids in job_events, and broadcast them once per topic: tenant:<t> (all) and tenant:<t>:user:<job owner> (cut by size only past 100 kB).';
-- ACL on FUNCTION private.job_events_flush_v4()
REVOKE ALL ON FUNCTION private.job_events_flush_v4() FROM PUBLIC;

-- FUNCTION private.job_events_restage_v3()
CREATE FUNCTION private.job_events_restage_v3() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    AS $$
declare
  v_direct text;
begin
  -- The flush's own insert, and only that (as v2).
  if current_setting('cpa.events_flushing', true) = 'on' and pg_trigger_depth() > 1 then
    return null;
  end if;
  if not exists (select 1 from new_rows) then
    return null;
  end if;
  v_direct := nullif(coalesce(current_setting('cpa.events_direct', true), ''), '');
  if v_direct is not null
     and not exists (select 1 from new_rows n where n.job_id::text <> v_direct) then
    return null;  -- job_submit_v3's events of the job it is creating: final ids already
  end if;
  perform private.job_events_stage_v1(array(
    select row(n.tenant_id, n.job_id, n.todo_id, n.kind, n.status, n.data,
               n.created_at)::private.job_event_draft
      from new_rows n where n.job_id::text is distinct from v_direct order by n.id));
  delete from public.job_events e using new_rows n
   where e.id = n.id and n.job_id::text is distinct from v_direct;
  return null;
end;
$$;
-- COMMENT on FUNCTION private.job_events_restage_v3()
COMMENT ON FUNCTION private.job_events_restage_v3() IS 'Move rows inserted into job_events outside the flush into the stage (v2), except the events cpa.job_submit_v3 writes for the job it is creating (cpa.events_direct).';
-- ACL on FUNCTION private.job_events_restage_v3()
REVOKE ALL ON FUNCTION private.job_events_restage_v3() FROM PUBLIC;

-- FUNCTION private.job_events_stage_v1(private.job_event_draft[])
CREATE FUNCTION private.job_events_stage_v1(p_events private.job_event_draft[]) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    AS $$
begin
  if coalesce(cardinality(p_events), 0) = 0 then
    return;
  end if;
  insert into private.job_events_staged (events) values (p_events);
  insert into private.job_events_flush (txid) values (pg_current_xact_id())
  on conflict (txid) do nothing;
end;
$$;
-- COMMENT on FUNCTION private.job_events_stage_v1(p_events private.job_event_draft[])
COMMENT ON FUNCTION private.job_events_stage_v1(p_events private.job_event_draft[]) IS 'Stage events in the current transaction and arm its flush at commit.';
-- ACL on FUNCTION private.job_events_stage_v1(p_events private.job_event_draft[])
REVOKE ALL ON FUNCTION private.job_events_stage_v1(p_events private.job_event_draft[]) FROM PUBLIC;

-- FUNCTION private.jobs_delete_events_v1()
CREATE FUNCTION private.jobs_delete_events_v1() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    AS $$
begin
  delete from public.job_events e using old_rows o where e.job_id = o.id;
  return null;
end;
$$;
-- ACL on FUNCTION private.jobs_delete_events_v1()
REVOKE ALL ON FUNCTION private.jobs_delete_events_v1() FROM PUBLIC;

-- FUNCTION private.jobs_events_v2()
CREATE FUNCTION private.jobs_events_v2() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    AS $$
declare
  v_direct text := coalesce(current_setting('cpa.events_direct', true), '');
begin
  if not exists (select 1 from new_rows) then
    return null;
  end if;
  if tg_op = 'INSERT' then
    if v_direct <> '' and not exists (select 1 from new_rows n where n.id::text <> v_direct) then
      return null;  -- job_submit_v3 writes this job's event itself
    end if;
    perform private.job_events_stage_v1(array(
      select row(n.tenant_id, n.id, null, 'job.status', n.status,
                 jsonb_build_object('intent', n.intent), now())::private.job_event_draft
        from new_rows n where n.id::text is distinct from nullif(v_direct, '') order by n.id));
  else
    -- As v1: a completion updates its job's todos_done on every flush; the status changes
    -- only at the end: check first.
    if not exists (select 1 from new_rows n join old_rows o on o.id = n.id
                   where n.status is distinct from o.status) then
      return null;
    end if;
    perform private.job_events_stage_v1(array(
      select row(n.tenant_id, n.id, null, 'job.status', n.status,
                 jsonb_strip_nulls(jsonb_build_object('error', n.error, 'todos_done', n.todos_done,
                                                      'todo_count', n.todo_count)),
                 now())::private.job_event_draft
        from new_rows n join old_rows o on o.id = n.id
       where n.status is distinct from o.status
       order by n.id));
  end if;
  return null;
end;
$$;
-- COMMENT on FUNCTION private.jobs_events_v2()
COMMENT ON FUNCTION private.jobs_events_v2() IS 'Stage job status events (v1), except the inserted row of the job cpa.job_submit_v3 is creating (cpa.events_direct), whose event it writes itself.';
-- ACL on FUNCTION private.jobs_events_v2()
REVOKE ALL ON FUNCTION private.jobs_events_v2() FROM PUBLIC;

-- FUNCTION private.realtime_topic_allowed_v1(text)
CREATE FUNCTION private.realtime_topic_allowed_v1(p_topic text) RETURNS boolean
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path TO ''
    AS $_$
declare
  v_uuid constant text := '[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}';
  v_parts text[];
  v_role text;
begin
  if p_topic is null or p_topic !~ ('^tenant:' || v_uuid || '(:(user|agents):' || v_uuid || ')?$') then
    return false;
  end if;
  v_parts := string_to_array(p_topic, ':');
  select m.role into v_role from public.memberships m
   where m.tenant_id = v_parts[2]::uuid and m.user_id = (select auth.uid());
  if v_role is null then
    return false;
  end if;
  if cardinality(v_parts) = 2 then
    return v_role in ('owner', 'admin');
  end if;
  if v_parts[3] = 'user' then
    return v_parts[4]::uuid = (select auth.uid()) or v_role in ('owner', 'admin');
  end if;
  return v_parts[4]::uuid = (select auth.uid());  -- agents: the user's own desktops only
end;
$_$;
-- COMMENT on FUNCTION private.realtime_topic_allowed_v1(p_topic text)
COMMENT ON FUNCTION private.realtime_topic_allowed_v1(p_topic text) IS 'Realtime join rule: tenant:<t> for owners/admins; tenant:<t>:user:<u> for u and owners/admins; tenant:<t>:agents:<u> for u only.';
-- ACL on FUNCTION private.realtime_topic_allowed_v1(p_topic text)
REVOKE ALL ON FUNCTION private.realtime_topic_allowed_v1(p_topic text) FROM PUBLIC;
GRANT ALL ON FUNCTION private.realtime_topic_allowed_v1(p_topic text) TO authenticated;
GRANT ALL ON FUNCTION private.realtime_topic_allowed_v1(p_topic text) TO service_role;

-- FUNCTION private.todos_events_v2()
CREATE FUNCTION private.todos_events_v2() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO ''
    AS $$
declare
  v_direct text := coalesce(current_setting('cpa.events_direct', true), '');
begin
  if not exists (select 1 from new_rows) then
    return null;
  end if;
  if tg_op = 'INSERT' then
    if v_direct = '' or exists (select 1 from new_rows n where n.job_id::text <> v_direct) then
      perform private.job_events_stage_v1(array(
        select row(n.tenant_id, n.job_id, n.id, 'todo.status', n.status,
                   jsonb_build_object('key', n.key, 'action', n.action, 'target', n.target),
                   now())::private.job_event_draft
          from new_rows n where n.job_id::text is distinct from nullif(v_direct, '')
         order by n.id));
    end if;
    if exists (select 1 from new_rows where status = 'ready') then
      perform pg_notify('cpa_todo_ready', 'insert');
      if exists (select 1 from new_rows n
                  where n.status = 'ready' and n.target = 'desktop' and n.run_after <= now()) then
        perform private.agent_wake_v1(array(
          select n.id from new_rows n
           where n.status = 'ready' and n.target = 'desktop' and n.run_after <= now()));
      end if;
    end if;
  else
    perform private.job_events_stage_v1(array(
      select row(n.tenant_id, n.job_id, n.id, 'todo.status', n.status,
                 jsonb_strip_nulls(jsonb_build_object(
                   'key', n.key, 'action', n.action, 'target', n.target, 'attempts', n.attempts,
                   'error', n.error,
                   'result', case when n.status = 'done' then n.result end)),
                 now())::private.job_event_draft
        from new_rows n join old_rows o on o.id = n.id
       where n.status is distinct from o.status
       order by n.id));
    if exists (select 1 from new_rows n join old_rows o on o.id = n.id
               where n.status = 'ready' and o.status is distinct from 'ready') then
      perform pg_notify('cpa_todo_ready', 'update');
      if exists (select 1 from new_rows n join old_rows o on o.id = n.id
                  where n.status = 'ready' and o.status is distinct from 'ready'
                    and n.target = 'desktop' and n.run_after <= now()) then
        perform private.agent_wake_v1(array(
          select n.id from new_rows n join old_rows o on o.id = n.id
           where n.status = 'ready' and o.status is distinct from 'ready'
             and n.target = 'desktop' and n.run_after <= now()));
      end if;
    end if;
  end if;
  return null;
end;
$$;
-- COMMENT on FUNCTION private.todos_events_v2()
COMMENT ON FUNCTION private.todos_events_v2() IS 'Stage ToDo status events and notify cpa_todo_ready, except for the inserted ToDos of the job cpa.job_submit_v3 is creating (cpa.events_direct); desktop ToDos that became ready wake their job owner''s agents (private.agent_wake_v1).';
-- ACL on FUNCTION private.todos_events_v2()
REVOKE ALL ON FUNCTION private.todos_events_v2() FROM PUBLIC;

-- TABLE public.job_events
CREATE TABLE public.job_events (
    id bigint NOT NULL,
    tenant_id uuid NOT NULL,
    job_id uuid NOT NULL,
    todo_id uuid,
    kind text NOT NULL,
    status text,
    data jsonb DEFAULT '{}'::jsonb NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL
)
PARTITION BY RANGE (created_at);
-- COMMENT on TABLE public.job_events
COMMENT ON TABLE public.job_events IS 'Append-only progress log (job and ToDo status changes, output, notifications). Feeds SSE (Last-Event-ID = id) and Realtime.';
-- COMMENT on COLUMN public.job_events.job_id
COMMENT ON COLUMN public.job_events.job_id IS 'The job (no foreign key: writers take it from the job or ToDo row they change; events are deleted with their job by the jobs_delete_events trigger).';
-- SEQUENCE public.job_events_id_seq
CREATE SEQUENCE public.job_events_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;
-- SEQUENCE OWNED BY public.job_events_id_seq
ALTER SEQUENCE public.job_events_id_seq OWNED BY public.job_events.id;
-- DEFAULT public.job_events id
ALTER TABLE ONLY public.job_events ALTER COLUMN id SET DEFAULT nextval('public.job_events_id_seq'::regclass);
-- CONSTRAINT public.job_events job_events_pkey
ALTER TABLE ONLY public.job_events
    ADD CONSTRAINT job_events_pkey PRIMARY KEY (id, created_at);
-- INDEX public.job_events_job_id_idx
CREATE INDEX job_events_job_id_idx ON ONLY public.job_events USING btree (job_id, id);
-- ROW SECURITY public.job_events
ALTER TABLE public.job_events ENABLE ROW LEVEL SECURITY;
-- ACL on TABLE public.job_events
GRANT SELECT ON TABLE public.job_events TO authenticated;
GRANT SELECT,INSERT ON TABLE public.job_events TO service_role;
-- ACL on SEQUENCE public.job_events_id_seq
GRANT SELECT,USAGE ON SEQUENCE public.job_events_id_seq TO service_role;

-- TABLE private.job_events_default
CREATE TABLE private.job_events_default (
    id bigint DEFAULT nextval('public.job_events_id_seq'::regclass) CONSTRAINT job_events_id_not_null NOT NULL,
    tenant_id uuid CONSTRAINT job_events_tenant_id_not_null NOT NULL,
    job_id uuid CONSTRAINT job_events_job_id_not_null NOT NULL,
    todo_id uuid,
    kind text CONSTRAINT job_events_kind_not_null NOT NULL,
    status text,
    data jsonb DEFAULT '{}'::jsonb CONSTRAINT job_events_data_not_null NOT NULL,
    created_at timestamp with time zone DEFAULT now() CONSTRAINT job_events_created_at_not_null NOT NULL
);
-- COMMENT on TABLE private.job_events_default
COMMENT ON TABLE private.job_events_default IS 'job_events rows no dated partition covers (creation ahead fell behind); moved out when their partition is created.';
-- CONSTRAINT private.job_events_default job_events_default_pkey
ALTER TABLE ONLY private.job_events_default
    ADD CONSTRAINT job_events_default_pkey PRIMARY KEY (id, created_at);
-- INDEX private.job_events_default_job_id_id_idx
CREATE INDEX job_events_default_job_id_id_idx ON private.job_events_default USING btree (job_id, id);
-- ROW SECURITY private.job_events_default
ALTER TABLE private.job_events_default ENABLE ROW LEVEL SECURITY;

-- TABLE private.job_events_flush
CREATE UNLOGGED TABLE private.job_events_flush (
    txid xid8 DEFAULT pg_current_xact_id() NOT NULL
);
-- COMMENT on TABLE private.job_events_flush
COMMENT ON TABLE private.job_events_flush IS 'One row per transaction with staged events; its deferred constraint trigger flushes them at commit. Unlogged: empty after a crash.';
-- CONSTRAINT private.job_events_flush job_events_flush_pkey
ALTER TABLE ONLY private.job_events_flush
    ADD CONSTRAINT job_events_flush_pkey PRIMARY KEY (txid);
-- ROW SECURITY private.job_events_flush
ALTER TABLE private.job_events_flush ENABLE ROW LEVEL SECURITY;

-- TABLE private.job_events_legacy
CREATE TABLE private.job_events_legacy (
    id bigint DEFAULT nextval('public.job_events_id_seq'::regclass) CONSTRAINT job_events_id_not_null NOT NULL,
    tenant_id uuid CONSTRAINT job_events_tenant_id_not_null NOT NULL,
    job_id uuid CONSTRAINT job_events_job_id_not_null NOT NULL,
    todo_id uuid,
    kind text CONSTRAINT job_events_kind_not_null NOT NULL,
    status text,
    data jsonb DEFAULT '{}'::jsonb CONSTRAINT job_events_data_not_null NOT NULL,
    created_at timestamp with time zone DEFAULT now() CONSTRAINT job_events_created_at_not_null NOT NULL
);
-- COMMENT on TABLE private.job_events_legacy
COMMENT ON TABLE private.job_events_legacy IS 'job_events rows written before partitioning (20261207004100); dropped by retention once all are older than the retention.';
-- COMMENT on COLUMN private.job_events_legacy.job_id
COMMENT ON COLUMN private.job_events_legacy.job_id IS 'The job (no foreign key: writers take it from the job or ToDo row they change; events are deleted with their job by the jobs_delete_events trigger).';
-- CONSTRAINT private.job_events_legacy job_events_legacy_pkey
ALTER TABLE ONLY private.job_events_legacy
    ADD CONSTRAINT job_events_legacy_pkey PRIMARY KEY (id, created_at);
-- INDEX private.job_events_created_brin
CREATE INDEX job_events_created_brin ON private.job_events_legacy USING brin (created_at);
-- COMMENT on INDEX private.job_events_created_brin
COMMENT ON INDEX private.job_events_created_brin IS 'Retention''s time range (cpa.retention_prune_v1): events are appended in time order, so BRIN, not a btree entry per event.';
-- INDEX private.job_events_job_id_idx
CREATE INDEX job_events_job_id_idx ON private.job_events_legacy USING btree (job_id, id);
-- ROW SECURITY private.job_events_legacy
ALTER TABLE private.job_events_legacy ENABLE ROW LEVEL SECURITY;

-- TABLE private.job_events_staged
CREATE UNLOGGED TABLE private.job_events_staged (
    txid xid8 DEFAULT pg_current_xact_id() NOT NULL,
    seq bigint NOT NULL,
    events private.job_event_draft[] NOT NULL
);
ALTER TABLE ONLY private.job_events_staged ALTER COLUMN events SET STORAGE EXTERNAL;
-- COMMENT on TABLE private.job_events_staged
COMMENT ON TABLE private.job_events_staged IS 'Events staged by the transaction txid, in order (seq, then array order); private.job_events_flush_v1 moves them to job_events at commit. Unlogged: empty after a crash.';
-- INDEX private.job_events_staged_txid_idx
CREATE INDEX job_events_staged_txid_idx ON private.job_events_staged USING btree (txid, seq);
-- ROW SECURITY private.job_events_staged
ALTER TABLE private.job_events_staged ENABLE ROW LEVEL SECURITY;

-- SEQUENCE private.job_events_staged_seq_seq
ALTER TABLE private.job_events_staged ALTER COLUMN seq ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME private.job_events_staged_seq_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

-- TABLE ATTACH private.job_events_default
ALTER TABLE ONLY public.job_events ATTACH PARTITION private.job_events_default DEFAULT;

-- TABLE ATTACH private.job_events_legacy
ALTER TABLE ONLY public.job_events ATTACH PARTITION private.job_events_legacy FOR VALUES FROM (MINVALUE) TO ('2026-12-08 00:00:00+00');

-- INDEX ATTACH private.job_events_default_job_id_id_idx
ALTER INDEX public.job_events_job_id_idx ATTACH PARTITION private.job_events_default_job_id_id_idx;

-- INDEX ATTACH private.job_events_default_pkey
ALTER INDEX public.job_events_pkey ATTACH PARTITION private.job_events_default_pkey;

-- INDEX ATTACH private.job_events_job_id_idx
ALTER INDEX public.job_events_job_id_idx ATTACH PARTITION private.job_events_job_id_idx;

-- INDEX ATTACH private.job_events_legacy_pkey
ALTER INDEX public.job_events_pkey ATTACH PARTITION private.job_events_legacy_pkey;

-- TRIGGER private.job_events_flush job_events_flush
CREATE CONSTRAINT TRIGGER job_events_flush AFTER INSERT ON private.job_events_flush DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION private.job_events_flush_v4();

-- TRIGGER public.job_events job_events_restage
CREATE TRIGGER job_events_restage AFTER INSERT ON public.job_events REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION private.job_events_restage_v3();

-- TRIGGER public.jobs jobs_delete_events
CREATE TRIGGER jobs_delete_events AFTER DELETE ON public.jobs REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION private.jobs_delete_events_v1();

-- TRIGGER public.jobs jobs_events_insert
CREATE TRIGGER jobs_events_insert AFTER INSERT ON public.jobs REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION private.jobs_events_v2();

-- TRIGGER public.jobs jobs_events_update
CREATE TRIGGER jobs_events_update AFTER UPDATE ON public.jobs REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION private.jobs_events_v2();

-- TRIGGER public.todos todos_events_insert
CREATE TRIGGER todos_events_insert AFTER INSERT ON public.todos REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION private.todos_events_v2();

-- TRIGGER public.todos todos_events_update
CREATE TRIGGER todos_events_update AFTER UPDATE ON public.todos REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION private.todos_events_v2();

-- POLICY public.job_events Job events are visible with their job
CREATE POLICY "Job events are visible with their job" ON public.job_events FOR SELECT TO authenticated USING (((tenant_id IN ( SELECT private.user_admin_tenant_ids_v1() AS user_admin_tenant_ids_v1)) OR (EXISTS ( SELECT 1
   FROM public.jobs j
  WHERE ((j.id = job_events.job_id) AND (j.created_by = ( SELECT auth.uid() AS uid)) AND (j.tenant_id IN ( SELECT private.user_tenant_ids_v1() AS user_tenant_ids_v1)))))));

-- POLICY realtime.messages Members receive their own topics, admins their tenant's
CREATE POLICY "Members receive their own topics, admins their tenant's" ON realtime.messages FOR SELECT TO authenticated USING (((extension = 'broadcast'::text) AND (topic = ( SELECT realtime.topic() AS topic)) AND ( SELECT private.realtime_topic_allowed_v1(( SELECT realtime.topic() AS topic)) AS realtime_topic_allowed_v1)));
