"""Job-creation rate limit through upstash-ratelimit, its Lua run by the local Redis."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
from cpa_scheduler import errors, ratelimit, settings

from tests.conftest import MemberFactory
from tests.functions.conftest import bearer
from tests.functions.upstash_bridge import bridge


async def test_upstash_limiter_refuses_past_the_limit() -> None:
    with bridge("tok") as url:
        limiter = ratelimit.UpstashLimiter(url, "tok", limit=3, window=60)
        tenant = str(uuid.uuid4())
        for _ in range(3):
            await limiter.hit(tenant)
        with pytest.raises(errors.RateLimitedError) as info:
            await limiter.hit(tenant)
        assert 1 <= info.value.retry_after <= 60
        await limiter.hit(str(uuid.uuid4()))  # another tenant has its own window


async def test_upstash_is_chosen_from_settings_and_used_by_the_api(
    app: Any, wire: Any, member_factory: MemberFactory
) -> None:
    with bridge("tok") as url:
        st = wire(
            upstash_redis_rest_url=url, upstash_redis_rest_token="tok", rate_limit=1, rate_window=60
        )
        assert isinstance(st.limiter, ratelimit.UpstashLimiter)
        m = await member_factory()
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as c:
            ok = await c.post("/v1/jobs", headers=bearer(m), json={"request": "Öffne Spotify"})
            limited = await c.post("/v1/jobs", headers=bearer(m), json={"request": "Öffne Spotify"})
    assert ok.status_code == 201
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1


async def test_wrong_upstash_token_is_unavailable_not_a_crash() -> None:
    with bridge("tok") as url:
        limiter = ratelimit.UpstashLimiter(url, "wrong", limit=3, window=60)
        with pytest.raises(errors.UnavailableError, match="rate limiter is unavailable"):
            await limiter.hit("t")


def test_postgres_is_the_default() -> None:
    cfg = settings.Settings(database_url="postgresql://x")
    assert isinstance(ratelimit.limiter(cfg, None), ratelimit.PostgresLimiter)  # type: ignore[arg-type]
