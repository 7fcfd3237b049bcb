"""A hand-written dependency-counter queue: the practical ceiling for this design.

No tenancy, no events, no leases, no audit: ToDos with a count of unfinished dependencies,
claims of 50 with SKIP LOCKED, and completion plus the release of dependents in one
transaction, run by 4 workers. Our dispatcher is quoted as a ratio to it.
"""

from __future__ import annotations

import asyncio
import time

import psycopg

SCHEMA = """
create table bl_todo (id bigint primary key, pending int not null, done bool not null default false,
                      claimed bool not null default false);
create table bl_edge (todo bigint not null, dep bigint not null);
create index on bl_edge (dep);
create index bl_ready on bl_todo (id) where pending = 0 and not claimed;
"""
CLAIM = """
update bl_todo set claimed = true where id in (
  select id from bl_todo where pending = 0 and not claimed order by id limit 50
  for update skip locked) returning id
"""
COMPLETE = """
with finished as (update bl_todo set done = true where id = any(%(ids)s) returning id)
update bl_todo t set pending = t.pending - r.n
from (select e.todo, count(*) as n from bl_edge e join finished f on f.id = e.dep
      group by e.todo) r
where t.id = r.todo
"""


async def load(url: str, chains: list[int]) -> int:
    """One chain per entry (its length); a chain of 1 is an independent ToDo. Returns the count."""
    todos, edges, next_id = [], [], 0
    for length in chains:
        for i in range(length):
            todos.append((next_id, 1 if i else 0))
            if i:
                edges.append((next_id, next_id - 1))
            next_id += 1
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(SCHEMA)
        async with conn.cursor() as cur:
            async with cur.copy("copy bl_todo (id, pending) from stdin") as copy:
                for row in todos:
                    await copy.write_row(row)
            async with cur.copy("copy bl_edge (todo, dep) from stdin") as copy:
                for row in edges:
                    await copy.write_row(row)
        await conn.execute("vacuum analyze")
    return next_id


async def worker(url: str, total: int, finished: list[int]) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        while finished[0] < total:
            ids = [row[0] for row in await (await conn.execute(CLAIM)).fetchall()]
            if not ids:
                await asyncio.sleep(0.001)
                continue
            async with conn.transaction():
                await conn.execute(COMPLETE, {"ids": ids})
            finished[0] += len(ids)


async def run(url: str, chains: list[int], workers: int = 4) -> float:
    """ToDos per second to drain the loaded graph."""
    total = await load(url, chains)
    finished = [0]
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(url, total, finished) for _ in range(workers)))
    return total / (time.perf_counter() - t0)
