-- Rate limits: a fixed-window counter per tenant and bucket, used for job creation when no
-- Upstash Redis is configured. One row per key and window; old windows are pruned on the way.

create table private.rate_limits (
  key text not null,
  window_start timestamptz not null,
  hits integer not null default 0,
  primary key (key, window_start)
);
comment on table private.rate_limits is 'Fixed-window request counters (Postgres-backed rate limiter).';

-- Job creation by a tenant: members may count against their own tenant only.
create function public.rate_limit_hit_v1(p_tenant_id uuid, p_limit integer, p_window_seconds integer)
returns table (allowed boolean, retry_after double precision)
language plpgsql security definer set search_path = ''
as $$
declare
  v_key text := 'jobs:' || p_tenant_id::text;
  v_start timestamptz := to_timestamp(floor(extract(epoch from now()) / p_window_seconds) * p_window_seconds);
  v_hits integer;
begin
  perform private.tenant_authorize_v1(p_tenant_id);
  insert into private.rate_limits as r (key, window_start, hits)
  values (v_key, v_start, 1)
  on conflict (key, window_start) do update set hits = r.hits + 1
  returning r.hits into v_hits;
  if random() < 0.01 then
    delete from private.rate_limits r where r.window_start < now() - make_interval(secs => 2 * p_window_seconds);
  end if;
  allowed := v_hits <= p_limit;
  retry_after := case when allowed then 0
                      else extract(epoch from (v_start + make_interval(secs => p_window_seconds) - now())) end;
  return next;
end;
$$;
comment on function public.rate_limit_hit_v1 is 'Count one request against a fixed window; allowed is false once the limit is passed.';

-- grants ---------------------------------------------------------------------------------------
revoke all on private.rate_limits from public, anon, authenticated;
revoke execute on function public.rate_limit_hit_v1(uuid, integer, integer) from public, anon;
grant execute on function public.rate_limit_hit_v1(uuid, integer, integer) to authenticated, service_role;

-- row level security ---------------------------------------------------------------------------
alter table private.rate_limits enable row level security;
-- No policies: only the security definer function above touches the table.
