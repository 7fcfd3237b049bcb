"""The store's vocabulary: typed rows, the error translation, and the query primitives.

Every operation module (:mod:`cpa_scheduler.job`, :mod:`cpa_scheduler.todo`,
:mod:`cpa_scheduler.tenant`) builds on :class:`Queries`, which runs a named query from
``sql/queries.sql`` on one connection inside its transaction. Driver errors are translated once,
in :func:`translate`.
"""

from __future__ import annotations

import contextlib
import json
import math
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from cpa_scheduler import errors, graph, sql

# psycopg is imported where it is first used (the pool, the error mapping): on Lambda the
# handler's import then stays near a bare FastAPI import (scripts/import_time.py).
if TYPE_CHECKING:
    import psycopg
    from psycopg.rows import DictRow

Row = dict[str, Any]
_T = TypeVar("_T")

# Attempts of an API operation that PostgreSQL aborted to break a deadlock (Session.job_cancel).
DEADLOCK_ATTEMPTS = 3
# How long a claim that fails a ToDo it holds waits for the ToDo's job
# (Session.todo_fail_unless_job_held): well below PostgreSQL's deadlock_timeout (1 s by
# default), so a cancel that holds the job and waits for the ToDo is never the one aborted.
CLAIM_LOCK_WAIT = "200ms"
# Defaults of CPA_SCHEDULE_CAP (active schedules per tenant) and CPA_SCHEDULE_JOBS_PER_MINUTE
# (jobs a tenant's schedules may start in one minute); the settings hand in the configured ones.
SCHEDULE_CAP = 100
SCHEDULE_JOBS_PER_MINUTE = 60


@dataclass(frozen=True, slots=True)
class JobRow:
    """A job as the store reads it: the columns of ``public.jobs``, which the job queries select."""

    id: uuid.UUID
    tenant_id: uuid.UUID
    created_by: uuid.UUID | None
    request: str | None
    intent: str | None
    status: graph.JobStatus
    priority: int
    idempotency_key: str | None
    todo_count: int
    todos_done: int
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    error: str | None
    retry_count: int
    max_retries: int
    run_at: datetime | None  # the earliest start of every ToDo
    time_zone: str  # the IANA zone the request's times were read in
    schedule_id: uuid.UUID | None  # the schedule whose occurrence made the job
    scheduled_for: datetime | None  # that occurrence
    traceparent: str | None  # the creating span's W3C trace context


@dataclass(frozen=True, slots=True)
class TodoRow:
    """A cloud ToDo as the dispatcher claimed it: what it needs to run it and answer for it."""

    id: uuid.UUID
    job_id: uuid.UUID
    tenant_id: uuid.UUID
    key: str
    action: str
    params: dict[str, Any]
    attempts: int  # this attempt's number (the claim counted it)
    max_attempts: int
    timer_until: datetime | None  # set once the ToDo has snoozed
    lease_expires_at: datetime | None
    error: str | None  # the last attempt's, e.g. that its lease expired
    # Leases of earlier attempts lost with their worker: not counted against max_attempts.
    lost_leases: int = 0

    @property
    def failed_attempts(self) -> int:
        """Attempts that count against ``max_attempts``, this one included."""
        return self.attempts - self.lost_leases


@contextlib.contextmanager
def translate() -> Iterator[None]:
    """Map driver errors onto domain errors."""
    import psycopg
    from psycopg import errors as pgerrors

    try:
        yield
    except pgerrors.NoDataFound as exc:  # P0002, raised by the SQL functions
        hint = exc.diag.message_hint or "It does not exist or is not visible to you."
        raise errors.NotFoundError(f"Not found: {hint}") from None
    except pgerrors.ObjectNotInPrerequisiteState as exc:  # 55000
        raise errors.ConflictError(exc.diag.message_primary or str(exc)) from None
    except pgerrors.UniqueViolation as exc:
        raise errors.ConflictError(
            f"That already exists: {exc.diag.message_detail or exc.diag.message_primary}."
        ) from None
    except (pgerrors.InvalidParameterValue, pgerrors.InvalidTextRepresentation) as exc:
        raise errors.InvalidError(exc.diag.message_primary or str(exc)) from None
    except (
        pgerrors.CheckViolation,
        pgerrors.ForeignKeyViolation,
        pgerrors.NotNullViolation,
    ) as exc:
        raise errors.InvalidError(f"The data breaks a rule: {exc.diag.message_primary}.") from None
    except psycopg.DataError as exc:  # 22xxx: NUL bytes, bad escapes, values out of range
        raise errors.InvalidError(
            f"A value cannot be stored: {exc.diag.message_primary or str(exc).strip()}."
        ) from None
    except pgerrors.InsufficientPrivilege as exc:
        raise errors.NotFoundError(
            f"Not found: the caller may not do this ({exc.diag.message_primary})."
        ) from None
    except UnicodeEncodeError as exc:  # psycopg encoding a str that holds a lone surrogate
        bad = exc.object[exc.start : exc.end] if isinstance(exc.object, str) else "?"
        raise errors.InvalidError(
            f"A text value contains {bad!r}, an unpaired surrogate that is not valid Unicode; "
            "send well-formed UTF-8."
        ) from None
    except pgerrors.DeadlockDetected as exc:  # 40P01; an OperationalError, so before those
        raise errors.DeadlockError(
            f"The database is unavailable: {str(exc).strip() or type(exc).__name__}."
        ) from None
    except pgerrors.LockNotAvailable as exc:  # 55P03, lock_timeout; also an OperationalError
        raise errors.LockTimeoutError(
            f"The database is unavailable: {str(exc).strip() or type(exc).__name__}."
        ) from None
    except (psycopg.OperationalError, psycopg.InterfaceError, TimeoutError) as exc:
        raise errors.UnavailableError(
            f"The database is unavailable: {str(exc).strip() or type(exc).__name__}."
        ) from None
    except psycopg.Error as exc:
        if exc.sqlstate != "CP403":  # the SQL functions' "belongs to another user"
            raise
        hint = f" {exc.diag.message_hint}" if exc.diag.message_hint else ""
        raise errors.ForbiddenError(f"{exc.diag.message_primary}{hint}") from None


def _claim_params(
    target: str, owner: str, limit: int, lease_seconds: float, tenant_cap: int | None
) -> dict[str, Any]:
    """The parameters ``todo_claim`` and ``todo_complete_claim`` share, for any tenant and
    action."""
    return {
        "target": target,
        "owner": owner,
        "limit": limit,
        "lease_seconds": lease_seconds,
        "tenant_id": None,
        "actions": None,
        "tenant_cap": tenant_cap,
    }


def _completed_and_claimed(
    rows: Sequence[tuple[int, TodoRow | None]],
) -> tuple[int, list[TodoRow]]:
    """``todo_complete_claim``'s rows as (ToDos completed, ToDos claimed)."""
    done = rows[0][0] if rows else 0
    return done, [todo for _, todo in rows if todo is not None]


def _done_and_todo(done: int, **columns: Any) -> tuple[int, TodoRow | None]:
    """A row of ``todo_complete_claim``: the done count, and the claimed ToDo if any."""
    return done, (TodoRow(**columns) if columns["id"] is not None else None)


def _jsonb(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)


@dataclass(frozen=True, slots=True)
class Submission:
    """A validated ``POST /v1/jobs`` as ``cpa.job_submit_v3`` takes it (see
    :meth:`Session.job_submit`)."""

    tenant_id: uuid.UUID | None  # None: the caller's oldest membership
    todos: Sequence[Mapping[str, Any]]
    request: str | None
    intent: str
    idempotency_key: str | None
    priority: int
    run_at: datetime | None
    time_zone: str
    traceparent: str | None
    rate_limit: tuple[int, int] | None  # (limit, window): count the Postgres limit in the call

    def params(self) -> dict[str, Any]:
        limit, window = self.rate_limit or (None, 60)
        return {
            "tenant_id": None if self.tenant_id is None else str(self.tenant_id),
            "request": self.request,
            "intent": self.intent,
            "todos": _jsonb(list(self.todos)),
            "idempotency_key": self.idempotency_key,
            "priority": self.priority,
            "max_retries": 3,
            "run_at": self.run_at,
            "time_zone": self.time_zone,
            "traceparent": self.traceparent,
            "rate_limit": limit,
            "rate_window": window,
        }


@contextlib.contextmanager
def rate_limited() -> Iterator[None]:
    """Driver errors as :func:`translate` maps them, and the Postgres rate limit's refusal
    (SQLSTATE CP429, the seconds to wait in DETAIL) as :class:`errors.RateLimitedError`."""
    import psycopg

    with translate():
        try:
            yield
        except psycopg.Error as exc:
            if exc.sqlstate != "CP429":
                raise
            wait = max(1, math.ceil(float(exc.diag.message_detail or 1)))
            said = (exc.diag.message_primary or "The tenant created too many jobs").rstrip(".")
            raise errors.RateLimitedError(f"{said}; retry in {wait} s.", retry_after=wait) from None


class Queries:
    """Named queries inside one transaction: the primitives every operation uses."""

    def __init__(self, conn: psycopg.AsyncConnection[DictRow]) -> None:
        self.conn = conn

    async def _all(self, name: str, params: Mapping[str, Any] | None = None) -> list[Row]:
        with translate():
            cur = await self.conn.execute(sql.get(name), params or {})
            if cur.description is None:
                return []
            return list(await cur.fetchall())

    async def _typed(self, name: str, params: Mapping[str, Any], cls: type[_T]) -> list[_T]:
        """Rows as frozen ``cls`` instances; the query selects exactly its fields."""
        from psycopg.rows import class_row

        with translate():
            cur = self.conn.cursor(row_factory=class_row(cls))
            await cur.execute(sql.get(name), params)
            return await cur.fetchall()

    async def _typed_one(self, name: str, params: Mapping[str, Any], cls: type[_T]) -> _T | None:
        """The first row as a frozen ``cls`` instance, or None; the query selects its fields."""
        from psycopg.rows import class_row

        with translate():
            cur = self.conn.cursor(row_factory=class_row(cls))
            await cur.execute(sql.get(name), params)
            return await cur.fetchone()

    async def _job(self, name: str, params: Mapping[str, Any]) -> JobRow:
        """The job a query always answers (its SQL function raises otherwise)."""
        job = await self._typed_one(name, params, JobRow)
        if job is None:
            raise errors.CpaError(f"The query {name!r} answered no job, but it always answers one.")
        return job

    async def _one(self, name: str, params: Mapping[str, Any] | None = None) -> Row | None:
        with translate():
            cur = await self.conn.execute(sql.get(name), params or {})
            return await cur.fetchone()

    async def _first(self, name: str, params: Mapping[str, Any]) -> Row:
        """The row of a query that always answers one (its SQL function raises otherwise)."""
        row = await self._one(name, params)
        if row is None:
            raise errors.CpaError(f"The query {name!r} answered no row, but it always answers one.")
        return row

    async def _scalar(self, name: str, params: Mapping[str, Any]) -> Any:
        return next(iter((await self._first(name, params)).values()))

    async def _again_on_deadlock(self, name: str, params: Mapping[str, Any]) -> JobRow:
        """``_job`` in a savepoint, tried again (``DEADLOCK_ATTEMPTS`` in all) when PostgreSQL
        aborts it to break a deadlock (40P01).

        The operations lock in one order (migration 20261128000200_cancel_lock_order), so a
        cycle needs a transaction that breaks it (one that fails a ToDo it claimed: agent.claim
        bounds that wait, :meth:`todo_fail_unless_job_held`, so this is the safety net). Rolling
        back to the savepoint releases the locks the attempt took, the other transaction
        finishes, and the next attempt sees its outcome: the request answers that (or a 409)
        instead of a 503. The dispatcher retries its whole transaction instead."""
        attempt = 1
        while True:
            try:
                with translate():
                    async with self.conn.transaction():
                        return await self._job(name, params)
            except errors.DeadlockError:
                if attempt >= DEADLOCK_ATTEMPTS:
                    raise
                attempt += 1


def _the_job(row: Mapping[str, Any] | None) -> str:
    if row is None:
        raise errors.CpaError("The query 'job_submit' answered no row, but it always answers one.")
    return str(next(iter(row.values())))


def _uuid(value: uuid.UUID | str, what: str) -> str:
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        raise errors.NotFoundError(f"The {what} id {value!r} is not a valid id.") from None
