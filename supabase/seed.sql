-- A demo tenant for local development. Users join it with `cpa-scheduler token --tenant demo`,
-- which names the tenant by the same id (uuid5 of "tenant:demo" in the CLI's namespace; see
-- cli._ident), so the token's tenant is this row.
insert into public.tenants (id, name)
values ('1b4bd6ca-1bd3-564e-9bdd-82e75db03da1', 'demo')
on conflict (id) do nothing;
