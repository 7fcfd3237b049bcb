-- Idempotency-Key with a body fingerprint. A repeated key used to answer the old job whatever
-- the body said, so a client bug (one key, two different jobs) silently lost the second job.
-- The API stores a hash of the normalised body with the key, in the request's transaction and
-- before the job is created; a true replay then answers the original job, and a different
-- body is refused with a conflict naming the key. Kept apart from job creation, so every
-- job-creation function (v1 here, later versions elsewhere) gets it unchanged.

create table private.job_idempotency (
  tenant_id uuid not null references public.tenants (id) on delete cascade,
  key text not null check (length(key) between 1 and 200),
  body_hash text not null check (length(body_hash) between 1 and 128),
  created_at timestamptz not null default now(),
  primary key (tenant_id, key)
);
comment on table private.job_idempotency is 'Hash of the body first sent with each Idempotency-Key, per tenant.';
create index job_idempotency_created_idx on private.job_idempotency (created_at);

-- Raises 55000 (the API answers 409) when the key was first used with another body.
create function cpa.idempotency_check_v1(p_tenant_id uuid, p_key text, p_body_hash text)
returns boolean
language plpgsql security definer set search_path = ''
as $$
declare
  v_hash text;
begin
  perform private.tenant_authorize_v1(p_tenant_id);
  insert into private.job_idempotency (tenant_id, key, body_hash)
  values (p_tenant_id, p_key, p_body_hash)
  on conflict (tenant_id, key) do nothing;
  if found then
    return true;
  end if;
  select i.body_hash into v_hash from private.job_idempotency i
   where i.tenant_id = p_tenant_id and i.key = p_key;
  if v_hash is distinct from p_body_hash then
    raise exception 'The Idempotency-Key % was first used with a different body; send the original body to get that job again, or use a new key for a new job.', left(p_key, 200)
      using errcode = '55000';
  end if;
  return false;
end;
$$;
comment on function cpa.idempotency_check_v1 is 'Record the body hash of a new Idempotency-Key; true when new, false for a replay, 55000 for a different body.';

-- grants ---------------------------------------------------------------------------------------
revoke all on private.job_idempotency from public, anon, authenticated;
revoke execute on function cpa.idempotency_check_v1(uuid, text, text) from public, anon;
grant execute on function cpa.idempotency_check_v1(uuid, text, text) to authenticated, service_role;

-- row level security ---------------------------------------------------------------------------
alter table private.job_idempotency enable row level security;
-- No policies: only the security definer function above touches the table.
