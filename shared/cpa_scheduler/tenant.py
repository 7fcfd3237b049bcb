"""The store's tenant-wide operations: rate limits, the plan cache, schedules, metrics, retention and memberships."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from cpa_scheduler import errors, query


class TenantQueries(query.Queries):
    """What concerns a tenant as a whole, not one job: limits, cache, schedules, metrics, set-up."""

    # rate limits and the plan cache -------------------------------------------------------

    async def rate_limit_hit(
        self, tenant_id: uuid.UUID | str, limit: int, window_seconds: int
    ) -> tuple[bool, float]:
        params = {"tenant_id": str(tenant_id), "limit": limit, "window_seconds": window_seconds}
        row = await self._first("rate_limit_hit", params)
        return bool(row["allowed"]), float(row["retry_after"])

    async def plan_cache_get(self, tenant_id: uuid.UUID | str, key: str) -> Any:
        return await self._scalar("plan_cache_get", {"tenant_id": str(tenant_id), "key": key})

    async def plan_cache_put(
        self, tenant_id: uuid.UUID | str, key: str, plan: Any, ttl: int
    ) -> None:
        params = {"tenant_id": str(tenant_id), "key": key, "plan": query._jsonb(plan), "ttl": ttl}
        await self._all("plan_cache_put", params)

    # schedules ----------------------------------------------------------------------------

    async def schedule_create(
        self, *, tenant_id: uuid.UUID | str, cron: str, time_zone: str, request: str | None,
        graph: Any, intent: str, todos: Sequence[Mapping[str, Any]], next_run_at: datetime,
        cap: int = query.SCHEDULE_CAP,
    ) -> query.Row:  # fmt: skip
        """A new schedule; a :class:`errors.ConflictError` when the tenant already has
        ``cap`` active schedules."""
        params = {
            "tenant_id": str(tenant_id), "cron": cron, "time_zone": time_zone, "request": request,
            "graph": None if graph is None else query._jsonb(graph), "intent": intent,
            "todos": query._jsonb(list(todos)), "next_run_at": next_run_at, "cap": cap,
        }  # fmt: skip
        return await self._first("schedule_create", params)

    async def schedule_get(self, schedule_id: uuid.UUID | str) -> query.Row:
        row = await self._one("schedule_get", {"schedule_id": query._uuid(schedule_id, "schedule")})
        if row is None:
            raise errors.NotFoundError(
                f"The schedule {schedule_id} does not exist or is not yours."
            )
        return row

    async def schedule_list(self, tenant_id: uuid.UUID | str, limit: int = 200) -> list[query.Row]:
        return await self._all("schedule_list", {"tenant_id": str(tenant_id), "limit": limit})

    async def schedule_pause(
        self,
        schedule_id: uuid.UUID | str,
        *,
        paused: bool,
        next_run_at: datetime | None = None,
        cap: int = query.SCHEDULE_CAP,
    ) -> query.Row:
        """Pause or resume; resuming past the tenant's ``cap`` of active schedules is a
        :class:`errors.ConflictError`."""
        params = {
            "schedule_id": query._uuid(schedule_id, "schedule"),
            "paused": paused,
            "next_run_at": next_run_at,
            "cap": cap,
        }
        return await self._first("schedule_pause", params)

    async def schedule_delete(self, schedule_id: uuid.UUID | str) -> None:
        await self._all("schedule_delete", {"schedule_id": query._uuid(schedule_id, "schedule")})

    async def schedule_due(self, now: datetime, limit: int = 50) -> list[query.Row]:
        return await self._all("schedule_due", {"now": now, "limit": limit})

    async def schedule_fire(
        self,
        schedule_id: uuid.UUID | str,
        occurrence: datetime,
        next_run_at: datetime,
        budget: int | None = query.SCHEDULE_JOBS_PER_MINUTE,
    ) -> query.JobRow:
        """The occurrence's job; past the tenant's ``budget`` of scheduled jobs in the
        occurrence's minute it is created cancelled, without ToDos (a skip)."""
        params = {
            "schedule_id": str(schedule_id),
            "occurrence": occurrence,
            "next_run_at": next_run_at,
            "budget": budget,
        }
        return await self._job("schedule_fire", params)

    # metrics and retention ----------------------------------------------------------------

    async def metrics_snapshot(self) -> list[query.Row]:
        return await self._all("metrics_snapshot")

    async def metrics_top_tenants(self, limit: int) -> list[query.Row]:
        return await self._all("metrics_top_tenants", {"limit": limit})

    async def retention_prune(
        self, *, job_days: int, audit_days: int, batch: int = 5000
    ) -> dict[str, int]:
        """One bounded batch of retention: old events, finished jobs, audit entries."""
        params = {"job_days": job_days, "audit_days": audit_days, "batch": batch}
        return dict(await self._scalar("retention_prune", params))

    # set-up (admin scope) -----------------------------------------------------------------

    async def membership_ensure(
        self, tenant_id: uuid.UUID | str, user_id: uuid.UUID | str, *, tenant_name: str,
        email: str | None = None, role: str = "owner",
    ) -> None:  # fmt: skip
        await self._all("user_ensure", {"user_id": str(user_id), "email": email})
        await self._all("tenant_ensure", {"tenant_id": str(tenant_id), "name": tenant_name})
        await self._all(
            "membership_ensure",
            {"tenant_id": str(tenant_id), "user_id": str(user_id), "role": role},
        )

    async def tenant_other_members(
        self, tenant_id: uuid.UUID | str, user_id: uuid.UUID | str
    ) -> bool:
        """Whether the tenant has members besides this user (admin scope)."""
        params = {"tenant_id": str(tenant_id), "user_id": str(user_id)}
        return bool(await self._scalar("tenant_other_members", params))

    async def my_tenants(self) -> list[uuid.UUID]:
        """The caller's tenants (user scope), oldest membership first."""
        rows = await self._all("membership_mine")
        return [uuid.UUID(str(r["tenant_id"])) for r in rows]

    async def my_memberships(self) -> list[query.Row]:
        """The caller's tenants with their names and the caller's role (user scope)."""
        return await self._all("membership_mine_named")

    async def tenant_of_user(self, user_id: uuid.UUID | str) -> uuid.UUID | None:
        row = await self._one("tenant_of_user", {"user_id": str(user_id)})
        return None if row is None else uuid.UUID(str(row["tenant_id"]))
