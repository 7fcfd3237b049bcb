-- A demo tenant for local development. Users join it with `cpa-scheduler token --tenant demo`.
insert into public.tenants (id, name)
values ('00000000-0000-4000-8000-00000000d3e0', 'demo')
on conflict (id) do nothing;
