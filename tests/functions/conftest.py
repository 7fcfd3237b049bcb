"""API fixtures: the ASGI app wired to the per-test database, tokens, and a live server."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from cpa_scheduler import api, auth, service, settings, store
from fastapi import FastAPI

from tests.conftest import Member

SECRET = "test-secret-with-enough-entropy-for-hs256-0123456789"
ISSUER = "https://test-project.supabase.co/auth/v1"


@pytest.fixture
def config(tmp_path: Path) -> settings.Settings:
    return settings.Settings(
        database_url="postgresql://unused",
        data_dir=tmp_path,
        supabase_jwt_secret=SECRET,
        supabase_url="https://test-project.supabase.co",
        rate_limit=1000,
    )


@pytest.fixture
def app() -> FastAPI:
    """The API app of the test; ``wire`` gives it its services."""
    return api.create_app()


@pytest.fixture
def wire(
    app: FastAPI, db: store.Store, config: settings.Settings
) -> Callable[..., service.Services]:
    """Give the app services over the test database, with settings overridden by keyword."""

    def make(**overrides: Any) -> service.Services:
        cfg = config.model_copy(update=overrides)
        verifier = auth.Verifier(
            hs256_secret=SECRET,
            jwks_url=cfg.jwks_url if "supabase_jwks_url" in overrides else None,
            issuer=ISSUER,
        )
        services = service.Services(cfg, db, verifier=verifier)
        app.state.services = services
        return services

    return make


@pytest.fixture
async def client(
    app: FastAPI, wire: Callable[..., service.Services]
) -> AsyncIterator[httpx.AsyncClient]:
    wire()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


def token_for(member: Member, **kw: Any) -> str:
    return auth.mint(SECRET, member.user_id, issuer=kw.pop("issuer", ISSUER), **kw)


def bearer(member: Member, **kw: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {token_for(member, **kw)}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def live_api(app: FastAPI, wire: Callable[..., service.Services]) -> AsyncIterator[str]:
    """The app under uvicorn on 127.0.0.1, in this event loop."""
    wire()
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    task = asyncio.create_task(server.serve())
    for _ in range(100):
        if server.started:
            break
        await asyncio.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    await task


@pytest.fixture
def user_id() -> uuid.UUID:
    return uuid.uuid4()
