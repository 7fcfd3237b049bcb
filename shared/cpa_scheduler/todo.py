"""The store's operations on ToDos: claims, completions, failures and leases, by the dispatcher and by desktop agents."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from cpa_scheduler import errors, query, sql


class TodoQueries(query.Queries):
    """ToDos as the dispatcher and desktop agents claim, complete, fail, release and extend them."""

    # todos --------------------------------------------------------------------------------

    async def todo_get(self, todo_id: uuid.UUID | str) -> query.Row:
        row = await self._one("todo_get", {"todo_id": query._uuid(todo_id, "ToDo")})
        if row is None:
            raise errors.NotFoundError(f"The ToDo {todo_id} does not exist or is not yours.")
        return row

    async def todo_claim(
        self,
        *,
        target: str,
        owner: str,
        limit: int,
        lease_seconds: float = 60.0,
        tenant_id: uuid.UUID | str | None = None,
        actions: Sequence[str] | None = None,
        tenant_cap: int | None = None,
    ) -> list[query.TodoRow]:
        params = query._claim_params(target, owner, limit, lease_seconds, tenant_cap)
        params.update(
            tenant_id=str(tenant_id) if tenant_id else None,
            actions=list(actions) if actions is not None else None,
        )
        return await self._typed("todo_claim", params, query.TodoRow)

    async def todo_complete_claim(
        self,
        items: Sequence[Mapping[str, Any]],
        *,
        target: str,
        owner: str,
        limit: int,
        lease_seconds: float = 60.0,
        tenant_cap: int | None = None,
    ) -> tuple[int, list[query.TodoRow]]:
        """Complete ``items`` (as :meth:`todo_complete`) and claim up to ``limit`` (as
        :meth:`todo_claim`) in one call: how many were completed, and the claimed rows."""
        from psycopg.rows import kwargs_row

        params = query._claim_params(target, owner, limit, lease_seconds, tenant_cap)
        params["items"] = query._jsonb(list(items))
        with query.translate():
            cur = self.conn.cursor(row_factory=kwargs_row(query._done_and_todo))
            await cur.execute(sql.get("todo_complete_claim"), params)
            return query._completed_and_claimed(await cur.fetchall())

    async def todo_complete(self, items: Sequence[Mapping[str, Any]]) -> int:
        return int(await self._scalar("todo_complete", {"items": query._jsonb(list(items))}))

    async def todo_fail(
        self, items: Sequence[Mapping[str, Any]], *, backoff_base: float = 1.0
    ) -> int:
        params = {"items": query._jsonb(list(items)), "backoff_base": backoff_base}
        return int(await self._scalar("todo_fail", params))

    async def todo_fail_unless_job_held(
        self,
        items: Sequence[Mapping[str, Any]],
        *,
        lock_wait: str = query.CLAIM_LOCK_WAIT,
        backoff_base: float = 1.0,
    ) -> int | None:
        """:meth:`todo_fail`, waiting at most ``lock_wait`` (a PostgreSQL interval) for a lock;
        None, with nothing changed, when another transaction holds what it needs that long.

        For a transaction that holds the ToDos it fails without their jobs (a claim:
        ``agent.claim`` fails a ToDo whose ``$ref`` it cannot resolve). todo_fail locks the
        jobs first, and a cancel that holds a job may wait for that very ToDo: a cycle against
        the lock order (job rows, then ToDo rows), which PostgreSQL breaks after its
        ``deadlock_timeout`` (1 s by default) by aborting the cancel. Giving up sooner ends the
        wait before then. The failure runs in a savepoint with a transaction-local
        ``lock_timeout``: on 55P03 the savepoint is rolled back (the ToDos stay as the caller
        left them, still held), and either way the transaction's ``lock_timeout`` is the one
        it had before."""
        params = {"items": query._jsonb(list(items)), "backoff_base": backoff_base}
        try:
            with query.translate():
                async with self.conn.transaction():  # a savepoint
                    row = await self._first("lock_timeout_set", {"value": lock_wait})
                    n = int(await self._scalar("todo_fail", params))
                    await self._first("lock_timeout_set", {"value": row["previous"]})
                    return n
        except errors.LockTimeoutError:
            # Rolling back to the savepoint undid its set_config too: lock_timeout is as before.
            return None

    async def todo_release(
        self, items: Sequence[Mapping[str, Any]], *, refusal: bool = False, max_refusals: int = 3
    ) -> int:
        params = {
            "items": query._jsonb(list(items)),
            "refusal": refusal,
            "max_refusals": max_refusals,
        }
        return int(await self._scalar("todo_release", params))

    async def todo_snooze(self, todo_id: uuid.UUID | str, owner: str, until: datetime) -> bool:
        params = {"todo_id": str(todo_id), "owner": owner, "until": until}
        return bool(await self._scalar("todo_snooze", params))

    async def todo_extend(
        self, ids: Sequence[uuid.UUID | str], owner: str, lease_seconds: float
    ) -> int:
        params = {"ids": [str(i) for i in ids], "owner": owner, "lease_seconds": lease_seconds}
        return int(await self._scalar("todo_extend", params))

    async def todo_held(
        self, leases: Sequence[tuple[uuid.UUID, int]], owner: str
    ) -> set[uuid.UUID]:
        """Of these running ToDos (id, attempt), the ones still leased to ``owner``."""
        params = {"ids": [str(i) for i, _ in leases], "attempts": [a for _, a in leases],
                  "owner": owner}  # fmt: skip
        return {uuid.UUID(str(r["id"])) for r in await self._all("todo_held", params)}

    async def todo_lease_owners(self, prefix: str) -> list[str]:
        """Owners (``prefix``...) of the leases on running ToDos."""
        return [str(r["owner"]) for r in await self._all("todo_lease_owners", {"prefix": prefix})]

    async def todo_reclaim_dead(self, owners: Sequence[str]) -> int:
        """Expire now the leases of dispatcher owners proven dead."""
        return int(await self._scalar("todo_reclaim_dead", {"owners": list(owners)}))

    async def todo_next_due(self, target: str = "cloud") -> datetime | None:
        """When the next ready ToDo (or schedule occurrence) comes due; None when none waits."""
        due = await self._scalar("todo_next_due", {"target": target})
        return due if isinstance(due, datetime) else None

    async def todo_job_results(self, job_id: uuid.UUID | str) -> dict[str, Any]:
        rows = await self._all("todo_job_results", {"job_id": str(job_id)})
        return {row["key"]: row["result"] for row in rows}

    async def todo_confirm(self, todo_id: uuid.UUID | str, *, approved: bool = True) -> query.Row:
        params = {"todo_id": query._uuid(todo_id, "ToDo"), "approved": approved}
        return await self._first("todo_confirm", params)

    async def todo_note(self, todo_id: uuid.UUID | str, kind: str, data: Mapping[str, Any]) -> int:
        params = {
            "todo_id": query._uuid(todo_id, "ToDo"),
            "kind": kind,
            "data": query._jsonb(dict(data)),
        }
        return int(await self._scalar("todo_note", params))

    # agents and desktop assignment --------------------------------------------------------

    async def agent_upsert(
        self, tenant_id: uuid.UUID | str, agent_key: str, name: str | None, actions: Sequence[str]
    ) -> query.Row:
        params = {
            "tenant_id": str(tenant_id),
            "agent_key": agent_key,
            "name": name,
            "actions": list(actions),
        }
        return await self._first("agent_upsert", params)

    async def agent_claim(
        self,
        tenant_id: uuid.UUID | str,
        agent_key: str,
        actions: Sequence[str] | None,
        limit: int,
        lease_seconds: float = 300.0,
    ) -> list[query.Row]:
        params = {
            "tenant_id": str(tenant_id),
            "agent_key": agent_key,
            "actions": list(actions) if actions is not None else None,
            "limit": limit,
            "lease_seconds": lease_seconds,
        }
        return await self._all("agent_claim", params)

    # An agent's reports on the ToDos it holds. The database derives the lease owner from the
    # agent key, so the items name no owner.

    async def agent_complete(self, agent_key: str, items: Sequence[Mapping[str, Any]]) -> int:
        params = {"agent_key": agent_key, "items": query._jsonb(list(items))}
        return int(await self._scalar("agent_complete", params))

    async def agent_fail(
        self, agent_key: str, items: Sequence[Mapping[str, Any]], *, backoff_base: float = 1.0
    ) -> int:
        params = {
            "agent_key": agent_key,
            "items": query._jsonb(list(items)),
            "backoff_base": backoff_base,
        }
        return int(await self._scalar("agent_fail", params))

    async def agent_release(
        self,
        agent_key: str,
        items: Sequence[Mapping[str, Any]],
        *,
        refusal: bool = False,
        max_refusals: int = 3,
    ) -> int:
        params = {
            "agent_key": agent_key,
            "items": query._jsonb(list(items)),
            "refusal": refusal,
            "max_refusals": max_refusals,
        }
        return int(await self._scalar("agent_release", params))

    async def agent_list(self, tenant_id: uuid.UUID | str, seen_seconds: float) -> list[query.Row]:
        """The tenant's agents the caller may see (row-level security: their own; owners and
        admins: all), with ``online`` (seen in the last ``seen_seconds``)."""
        return await self._all(
            "agent_list", {"tenant_id": str(tenant_id), "seen_seconds": seen_seconds}
        )

    async def agent_offering(
        self, tenant_id: uuid.UUID | str, action: str, seen_seconds: float = 600.0
    ) -> bool:
        params = {"tenant_id": str(tenant_id), "action": action, "seen_seconds": seen_seconds}
        return bool(await self._scalar("agent_offering", params))

    async def job_route(self, job_id: uuid.UUID | str, agent_key: str) -> int:
        """Pin the job's unstarted desktop ToDos to one agent."""
        return int(await self._scalar("job_route", {"job_id": str(job_id), "agent_key": agent_key}))

    async def desktop_sweep(self, seen_seconds: float = 120.0) -> int:
        return int(await self._scalar("desktop_sweep", {"seen_seconds": seen_seconds}))
