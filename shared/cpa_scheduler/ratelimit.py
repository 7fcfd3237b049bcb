"""Per-tenant rate limiting of job creation: Upstash Redis when configured, else Postgres."""

from __future__ import annotations

import math
import time
from typing import Protocol

from cpa_scheduler import errors, settings, store


class Limiter(Protocol):
    async def hit(self, tenant_id: str, session: store.Session | None = None) -> None:
        """Count one request; raise :class:`RateLimitedError` past the limit.

        ``session``: the request's transaction, which the Postgres limiter counts in (so a
        request costs one transaction); without it the limiter opens its own."""


def _refuse(limit: int, window: int, retry_after: float) -> errors.RateLimitedError:
    wait = max(1, math.ceil(retry_after))
    return errors.RateLimitedError(
        f"The tenant created more than {limit} jobs and schedules in {window} seconds (the "
        f"limit CPA_RATE_LIMIT); retry in {wait} s.",
        retry_after=wait,
    )


class PostgresLimiter:
    """A fixed window per tenant in ``private.rate_limits``."""

    def __init__(self, db: store.Store, *, limit: int, window: int) -> None:
        self._db, self.limit, self.window = db, limit, window

    async def hit(self, tenant_id: str, session: store.Session | None = None) -> None:
        if session is not None:
            allowed, retry_after = await session.rate_limit_hit(tenant_id, self.limit, self.window)
        else:
            async with self._db.service() as own:
                allowed, retry_after = await own.rate_limit_hit(tenant_id, self.limit, self.window)
        if not allowed:
            raise _refuse(self.limit, self.window, retry_after)


class UpstashLimiter:
    """``upstash-ratelimit``'s fixed window over the Upstash Redis REST API."""

    def __init__(self, url: str, token: str, *, limit: int, window: int) -> None:
        from upstash_ratelimit.asyncio import FixedWindow, Ratelimit
        from upstash_redis.asyncio import Redis

        self.limit, self.window = limit, window
        self._ratelimit = Ratelimit(
            redis=Redis(url=url, token=token, allow_telemetry=False),
            limiter=FixedWindow(max_requests=limit, window=window, unit="s"),
            prefix="cpa:jobs",
        )

    async def hit(self, tenant_id: str, session: store.Session | None = None) -> None:
        try:
            response = await self._ratelimit.limit(tenant_id)
        except Exception as exc:  # the REST call failed: the limiter is unavailable
            raise errors.UnavailableError(f"The rate limiter is unavailable: {exc}.") from None
        if not response.allowed:
            raise _refuse(self.limit, self.window, response.reset - time.time())


def limiter(config: settings.Settings, db: store.Store) -> Limiter:
    """Upstash when both Upstash variables are set, Postgres otherwise."""
    if config.upstash is not None:
        url, token = config.upstash
        return UpstashLimiter(
            url,
            token,
            limit=config.rate_limit,
            window=config.rate_window,
        )
    return PostgresLimiter(db, limit=config.rate_limit, window=config.rate_window)
