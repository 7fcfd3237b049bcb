"""The data layer: psycopg 3 (async, pooled) over the named queries in ``sql/queries.sql``.

Three scopes, each one transaction:

- :meth:`Store.user` runs as ``authenticated`` with the verified JWT claims set locally in the
  transaction (what PostgREST does), so row-level security decides what the caller sees;
- :meth:`Store.service` runs as ``service_role`` (the dispatcher);
- :meth:`Store.admin` runs as the login role, for local set-up only (tenants, users).

Connections never use prepared statements (``prepare_threshold=None``), so the layer works
through Supabase's transaction pooler. Driver errors are translated once, in :func:`translate`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

from cpa_scheduler import errors, job, query, sql, tenant, todo

# psycopg is imported where it is first used (the pool, the error mapping): on Lambda the
# handler's import then stays near a bare FastAPI import (scripts/import_time.py).
if TYPE_CHECKING:
    import psycopg
    from psycopg.rows import DictRow
    from psycopg_pool import AsyncConnectionPool

# The store's vocabulary, by the names the rest of the package uses (store.JobRow, ...).
Row = query.Row
JobRow = query.JobRow
TodoRow = query.TodoRow
Submission = query.Submission
translate = query.translate
rate_limited = query.rate_limited
SCHEDULE_CAP = query.SCHEDULE_CAP
SCHEDULE_JOBS_PER_MINUTE = query.SCHEDULE_JOBS_PER_MINUTE

# A dead network (packets dropped, no reset) answers nothing: without a bound a call waits for
# good. A request's statements run with statement_timeout = CPA_DB_TIMEOUT, and each wait for
# an answer gives up DEADLINE_MARGIN later (the server's own timeout error comes first when it
# is alive); the dispatcher's work (no statement timeout) waits up to SERVICE_DEADLINE seconds.
# A call that gives up closes its connection, which the pool then replaces.
DEADLINE_MARGIN = 0.5
SERVICE_DEADLINE = 15.0
# /readyz answers within 3 s: its ping waits this long for a connection, and as long again for
# the answer.
PING_WAIT = 1.25


class Session(job.JobQueries, todo.TodoQueries, tenant.TenantQueries):
    """Named operations inside one transaction, by subject in :mod:`cpa_scheduler.job`,
    :mod:`cpa_scheduler.todo` and :mod:`cpa_scheduler.tenant`."""


def connect_options(timeout: float) -> dict[str, Any]:
    """libpq options of every connection: TCP keepalives (an idle connection whose peer is gone
    is noticed within ~20 s) and tcp_user_timeout (data left unacknowledged that long breaks
    the connection), so a dropped network ends in an error, not a hang."""
    return {
        "connect_timeout": max(2, math.ceil(timeout)),
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 3,
        "keepalives_count": 3,
        "tcp_user_timeout": int(max(timeout + DEADLINE_MARGIN, 5.0) * 1000),
    }


@functools.cache
def connection_class() -> type[psycopg.AsyncConnection[DictRow]]:
    """AsyncConnection whose waits for the server honour :attr:`deadline` (made on first use:
    psycopg stays out of the Lambda cold import)."""
    import psycopg
    from psycopg import errors as pgerrors

    class BoundedConnection(psycopg.AsyncConnection[Any]):
        """A connection with an optional deadline (seconds) for each wait for the server. Past
        it the connection is closed (its state is unknown: a query may be in flight) and the
        call raises OperationalError, which :func:`query.translate` makes a 503."""

        deadline: float | None = None

        # psycopg's own signature, overridden: its timeout parameter is psycopg's.
        async def wait(
            self,
            gen: Any,
            interval: float = 0.1,
            timeout: float | None = None,  # noqa: ASYNC109
        ) -> Any:
            if timeout is not None or self.deadline is None:
                return await super().wait(gen, interval, timeout)
            try:
                return await super().wait(gen, interval, self.deadline)
            except pgerrors._WaitTimeout:
                self.pgconn.finish()
                raise psycopg.OperationalError(
                    f"the database did not answer within {self.deadline:g} s (a dead network?); "
                    "the connection was closed"
                ) from None

    found: type[psycopg.AsyncConnection[DictRow]] = BoundedConnection
    return found


async def _transactional(conn: psycopg.AsyncConnection[DictRow]) -> None:
    """The pool's reset: every connection goes back to the pool out of autocommit (which only
    :meth:`Store.submit` turns on, for one call), so every scope is one transaction."""
    if conn.autocommit:
        await conn.set_autocommit(False)


class Store:
    """A connection pool and the three transaction scopes."""

    def __init__(
        self,
        url: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        timeout: float = 2.0,
        lost_lease_limit: int = 5,
    ) -> None:
        from psycopg.rows import dict_row
        from psycopg_pool import AsyncConnectionPool

        self.url = url
        self.timeout = timeout
        # Every scope sets it for the lease expiry its claims run (CPA_LOST_LEASE_LIMIT).
        self._limits = {"lost_lease_limit": str(lost_lease_limit)}
        self._user_limits = {**self._limits, "statement_timeout": f"{int(timeout * 1000)}ms"}
        # While the database is down a request must get its 503 in about `timeout` seconds,
        # not the pool's default 30: the wait for a connection and each new connection are
        # bounded. The pool's background reconnect backs off exponentially without a cap (1, 2,
        # 4 ... s until reconnect_timeout); a short reconnect_timeout ends that series early, and
        # the next request or claim then starts a fresh attempt at once, so a recovered
        # database is used again within seconds rather than after minutes of backoff.
        self._pool: AsyncConnectionPool[psycopg.AsyncConnection[DictRow]] = AsyncConnectionPool(
            url,
            min_size=min_size,
            max_size=max_size,
            open=False,
            timeout=timeout,
            reconnect_timeout=5,
            kwargs={
                "prepare_threshold": None,
                "row_factory": dict_row,
                "autocommit": False,
                **connect_options(timeout),
            },
            connection_class=connection_class(),
            reset=_transactional,
        )
        self._request_deadline = timeout + DEADLINE_MARGIN
        self._opened = False
        self._opening: asyncio.Lock | None = None
        self._submit_as = True  # see submit: False once the login role may not call it

    async def open(self) -> None:
        if self._opened:
            return
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:  # concurrent first users must not open the pool twice
            if self._opened:
                return
            import psycopg

            with query.translate():
                # One direct connection first: a wrong URL fails now, with the server's reason.
                probe = await asyncio.wait_for(
                    psycopg.AsyncConnection.connect(
                        self.url, **{**connect_options(self.timeout), "connect_timeout": 10}
                    ),
                    timeout=max(self.timeout, 2.0),
                )
                await probe.close()
                await self._pool.open(wait=True, timeout=10)
                self._opened = True

    async def close(self) -> None:
        if self._opened:
            await self._pool.close()
            self._opened = False

    @contextlib.asynccontextmanager
    async def _connection(
        self, deadline: float, wait: float | None = None
    ) -> AsyncIterator[psycopg.AsyncConnection[DictRow]]:
        """A pooled connection whose waits for the server give up after ``deadline`` s
        (``wait``: how long to wait for the connection, default ``timeout``)."""
        async with self._pool.connection(timeout=wait) as conn:
            bounded = cast(Any, conn)
            bounded.deadline = deadline
            try:
                yield conn
            finally:
                bounded.deadline = None

    @contextlib.asynccontextmanager
    async def _scope(
        self,
        first: str | None,
        params: Mapping[str, Any],
        deadline: float = SERVICE_DEADLINE,
        wait: float | None = None,
    ) -> AsyncIterator[Session]:
        await self.open()
        with query.translate():
            async with self._connection(deadline, wait) as conn, conn.transaction():
                if first is not None:
                    await conn.execute(sql.get(first), params)
                yield Session(conn)

    def user(self, claims: Mapping[str, Any]) -> contextlib.AbstractAsyncContextManager[Session]:
        """A transaction as ``authenticated`` with these verified claims: request work, its
        statements bounded by ``statement_timeout`` = ``timeout`` and each answer by
        ``timeout`` plus a margin (a dead network is a 503 in about ``timeout`` s)."""
        params = {"claims": query._jsonb(dict(claims)), **self._user_limits}
        return self._scope("session_user_scope", params, self._request_deadline)

    async def submit(self, claims: Mapping[str, Any], submission: query.Submission) -> str:
        """:meth:`Session.job_submit` as ``authenticated`` with these verified claims, in a
        transaction of its own, in one statement and one round trip: ``private.job_submit_as_v1``
        sets the claims for the transaction (as :meth:`user` does) and then calls
        ``cpa.job_submit_v3`` as ``authenticated``; the connection runs in autocommit for this
        call only, so the statement's transaction commits before the server answers, and an
        error rolls all of it back. The pool's reset (:func:`_transactional`) returns the
        connection to transactions, also after an error.

        ``private.job_submit_as_v1`` is executable by its owner only (the role that runs the
        migrations). A login role that may not call it gets the previous way, which needs no
        such grant: the claims and the call as two statements of one pipeline, without a BEGIN
        (one implicit transaction, committed at the pipeline's Sync)."""
        await self.open()
        if self._submit_as:
            try:
                return await self._submit_as_one(claims, submission)
            except errors.NotFoundError as exc:
                if "job_submit_as_v1" not in exc.message:
                    raise
                self._submit_as = False  # not the owner: two statements from now on
        return await self._submit_pipelined(claims, submission)

    async def _submit_as_one(self, claims: Mapping[str, Any], submission: query.Submission) -> str:
        params = {"claims": query._jsonb(dict(claims)), **submission.params()}
        with rate_limited():
            async with self._connection(self._request_deadline) as conn:
                await conn.set_autocommit(True)
                cur = await conn.execute(sql.get("job_submit_as"), params)
                row = await cur.fetchone()
                await conn.set_autocommit(False)
        return query._the_job(row)

    async def _submit_pipelined(
        self, claims: Mapping[str, Any], submission: query.Submission
    ) -> str:
        from psycopg import AsyncPipeline

        if not AsyncPipeline.is_supported():  # a libpq without pipeline mode: three trips
            async with self.user(claims) as session:
                return await session.submit(submission)
        scope = {"claims": query._jsonb(dict(claims)), **self._user_limits}
        params = submission.params()
        with rate_limited():
            async with self._connection(self._request_deadline) as conn:
                await conn.set_autocommit(True)
                async with conn.pipeline():  # its end sends the Sync and reads every answer
                    await conn.execute(sql.get("session_user_scope"), scope)
                    cur = await conn.execute(sql.get("job_submit"), params)
                row = await cur.fetchone()
                await conn.set_autocommit(False)
        return query._the_job(row)

    async def claim(
        self,
        items: Sequence[Mapping[str, Any]],
        *,
        target: str,
        owner: str,
        limit: int,
        lease_seconds: float = 60.0,
        tenant_cap: int | None = None,
    ) -> tuple[int, list[query.TodoRow]]:
        """:meth:`Session.todo_complete_claim` (:meth:`Session.todo_claim` when ``items`` is
        empty) as ``service_role``, in a transaction of its own and one round trip: the role
        and the call as two statements of one pipeline on an autocommit connection, one
        implicit transaction committed at the pipeline's Sync (as :meth:`submit`'s fallback).
        A ``service()`` scope costs four trips (BEGIN, role, call, COMMIT), and the
        dispatcher's claim loop waits on each: a dependent starts only after them."""
        from psycopg import AsyncPipeline
        from psycopg.rows import class_row, kwargs_row

        if not AsyncPipeline.is_supported():  # a libpq without pipeline mode: four trips
            async with self.service() as session:
                if not items:
                    claimed = await session.todo_claim(
                        target=target, owner=owner, limit=limit,
                        lease_seconds=lease_seconds, tenant_cap=tenant_cap,
                    )  # fmt: skip
                    return 0, claimed
                return await session.todo_complete_claim(
                    items, target=target, owner=owner, limit=limit,
                    lease_seconds=lease_seconds, tenant_cap=tenant_cap,
                )  # fmt: skip
        await self.open()
        params = query._claim_params(target, owner, limit, lease_seconds, tenant_cap)
        name, factory = "todo_claim", cast(Any, class_row(query.TodoRow))
        if items:
            params["items"] = query._jsonb(list(items))
            name, factory = "todo_complete_claim", kwargs_row(query._done_and_todo)
        with query.translate():
            async with self._connection(SERVICE_DEADLINE) as conn:
                await conn.set_autocommit(True)
                async with conn.pipeline():  # its end sends the Sync and reads every answer
                    await conn.execute(sql.get("session_service_scope"), self._limits)
                    cur = conn.cursor(row_factory=factory)
                    await cur.execute(sql.get(name), params)
                await conn.set_autocommit(False)
                rows: list[Any] = await cur.fetchall()
        return query._completed_and_claimed(rows) if items else (0, rows)

    def service(self) -> contextlib.AbstractAsyncContextManager[Session]:
        """A transaction as ``service_role`` (bypasses RLS)."""
        return self._scope("session_service_scope", self._limits)

    def admin(self) -> contextlib.AbstractAsyncContextManager[Session]:
        """A transaction as the login role (local set-up)."""
        return self._scope(None, {})

    async def ping(self) -> bool:
        """Whether the database answers, within about 2 * PING_WAIT seconds."""
        try:
            async with self._scope(None, {}, PING_WAIT, wait=PING_WAIT) as session:
                await session.conn.execute("select 1")
        except errors.UnavailableError:
            return False
        return True
