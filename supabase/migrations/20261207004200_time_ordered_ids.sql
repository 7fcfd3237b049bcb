-- Time-ordered ids for new ToDos and jobs (issue 24: history that costs nothing).
--
-- gen_random_uuid() spreads new keys over the whole primary key index: a drain of 10,000 new
-- ToDos in a database holding 2,000,000 touched ~10,000 different leaf pages of todos_pkey
-- (and of todo_edges' keys, which lead with a ToDo id) where a fresh database touched a few
-- dozen, and each update of a ToDo (non-HOT: the partial indexes name its status) adds an
-- entry next to its old one. So the working set of the hot indexes grew with the history: more
-- buffer misses, and a full-page image in the WAL for each page first touched after a
-- checkpoint (bench_growth: 1.2x the database CPU per ToDo against a fresh database).
-- A UUID version 7 (48 bits of Unix milliseconds, then random bits; RFC 9562) puts today's keys
-- next to each other at the right edge of the index, whatever its size. PostgreSQL 18 has
-- uuidv7(); this is the same layout for 15 and 17. Existing ids stay as they are.

create function private.uuid_v7_v1()
returns uuid
language sql volatile parallel safe set search_path = ''
as $$
  -- The first 6 bytes of a random (version 4) UUID become the time; bits 52 and 53 turn its
  -- version nibble from 4 (0100) into 7 (0111); the variant bits stay.
  select encode(
    set_bit(set_bit(
      overlay(uuid_send(gen_random_uuid())
              placing substring(int8send(floor(extract(epoch from clock_timestamp()) * 1000)::bigint)
                                from 3)
              from 1 for 6),
      52, 1), 53, 1),
    'hex')::uuid
$$;
comment on function private.uuid_v7_v1 is 'A time-ordered UUID (version 7: Unix milliseconds, then random bits), the default id of new ToDos and jobs.';
revoke execute on function private.uuid_v7_v1() from public, anon;
grant execute on function private.uuid_v7_v1() to authenticated, service_role;

alter table public.todos alter column id set default private.uuid_v7_v1();
alter table public.jobs alter column id set default private.uuid_v7_v1();
