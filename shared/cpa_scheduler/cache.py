"""The plan cache: plans per tenant and normalised request, in Upstash Redis or Postgres."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

from cpa_scheduler import settings, store

TTL = 24 * 3600


class PlanCache(Protocol):
    async def get(self, tenant_id: str, key: str) -> Any: ...

    async def put(self, tenant_id: str, key: str, plan: Any, ttl: int) -> None: ...


@dataclass
class PostgresPlanCache:
    """``private.plan_cache`` through the service role."""

    db: store.Store

    async def get(self, tenant_id: str, key: str) -> Any:
        async with self.db.service() as session:
            return await session.plan_cache_get(tenant_id, key)

    async def put(self, tenant_id: str, key: str, plan: Any, ttl: int) -> None:
        async with self.db.service() as session:
            await session.plan_cache_put(tenant_id, key, plan, ttl)


class UpstashPlanCache:
    """Upstash Redis (REST) with a TTL per entry."""

    def __init__(self, url: str, token: str) -> None:
        from upstash_redis.asyncio import Redis

        self._redis = Redis(url=url, token=token, allow_telemetry=False)

    async def get(self, tenant_id: str, key: str) -> Any:
        raw = await self._redis.get(f"cpa:plan:{tenant_id}:{key}")
        return None if raw is None else json.loads(raw)

    async def put(self, tenant_id: str, key: str, plan: Any, ttl: int) -> None:
        await self._redis.set(f"cpa:plan:{tenant_id}:{key}", json.dumps(plan), ex=ttl)


def cache_for(config: settings.Settings, db: store.Store | None) -> PlanCache | None:
    """Upstash when configured, else Postgres (when there is a store)."""
    if config.upstash is not None:
        return UpstashPlanCache(*config.upstash)
    return PostgresPlanCache(db) if db is not None else None
