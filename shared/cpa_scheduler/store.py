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
import json
import math
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar, cast

from cpa_scheduler import errors, graph, sql

# psycopg is imported where it is first used (the pool, the error mapping): on Lambda the
# handler's import then stays near a bare FastAPI import (scripts/import_time.py).
if TYPE_CHECKING:
    import psycopg
    from psycopg.rows import DictRow
    from psycopg_pool import AsyncConnectionPool

Row = dict[str, Any]
_T = TypeVar("_T")

# Attempts of an API operation that PostgreSQL aborted to break a deadlock (Session.job_cancel).
DEADLOCK_ATTEMPTS = 3
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


class Session:
    """Named operations inside one transaction."""

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

    # jobs ---------------------------------------------------------------------------------

    async def job_create(
        self,
        *,
        tenant_id: uuid.UUID | str,
        todos: Sequence[Mapping[str, Any]],
        request: str | None = None,
        intent: str | None = None,
        idempotency_key: str | None = None,
        priority: int = 0,
        max_retries: int = 3,
        run_at: datetime | None = None,
        time_zone: str = "UTC",
    ) -> JobRow:
        return await self._job(
            "job_create",
            {
                "tenant_id": str(tenant_id),
                "request": request,
                "intent": intent,
                "todos": _jsonb(list(todos)),
                "idempotency_key": idempotency_key,
                "priority": priority,
                "max_retries": max_retries,
                "run_at": run_at,
                "time_zone": time_zone,
            },
        )

    async def idempotency_check(self, tenant_id: uuid.UUID | str, key: str, body_hash: str) -> bool:
        """Record a new key's body hash (True); False for a replay; ConflictError otherwise."""
        params = {"tenant_id": str(tenant_id), "key": key, "body_hash": body_hash}
        return bool(await self._scalar("idempotency_check", params))

    async def job_submit(
        self,
        *,
        tenant_id: uuid.UUID | None,
        todos: Sequence[Mapping[str, Any]],
        request: str | None,
        intent: str,
        idempotency_key: str | None,
        priority: int,
        run_at: datetime | None,
        time_zone: str,
        traceparent: str | None,
        rate_limit: tuple[int, int] | None,
    ) -> str:
        """Create a job and answer it as the API's JSON text, in one call (``cpa.job_submit_v3``).

        ``tenant_id`` None: the caller's oldest membership. ``rate_limit`` ``(limit, window)``:
        count the Postgres rate limit in the same call (:class:`errors.RateLimitedError` past it,
        and the job is not created)."""
        return await self.submit(
            Submission(
                tenant_id=tenant_id, todos=todos, request=request, intent=intent,
                idempotency_key=idempotency_key, priority=priority, run_at=run_at,
                time_zone=time_zone, traceparent=traceparent, rate_limit=rate_limit,
            )
        )  # fmt: skip

    async def submit(self, submission: Submission) -> str:
        """:meth:`job_submit` of a prepared :class:`Submission`, in this transaction."""
        with rate_limited():
            return str(await self._scalar("job_submit", submission.params()))

    async def job_by_idempotency_key(self, tenant_id: uuid.UUID | str, key: str) -> JobRow | None:
        params = {"tenant_id": str(tenant_id), "key": key}
        return await self._typed_one("job_by_idempotency_key", params, JobRow)

    async def job_get(self, job_id: uuid.UUID | str) -> JobRow:
        job = await self._typed_one("job_get", {"job_id": _uuid(job_id, "job")}, JobRow)
        if job is None:
            raise errors.NotFoundError(f"The job {job_id} does not exist or is not yours.")
        return job

    async def job_list(
        self,
        *,
        tenant_id: uuid.UUID | str | None = None,
        status: graph.JobStatus | None = None,
        before: tuple[datetime, uuid.UUID] | None = None,
        limit: int = 50,
    ) -> list[JobRow]:
        return await self._typed(
            "job_list",
            {
                "tenant_id": str(tenant_id) if tenant_id else None,
                "status": status,
                "before_created": before[0] if before else None,
                "before_id": before[1] if before else None,
                "limit": limit,
            },
            JobRow,
        )

    async def task_list(
        self,
        *,
        tenant_id: uuid.UUID | str,
        status: graph.JobStatus | None = None,
        key_prefix: str | None = None,
        changed_after: datetime | None = None,
        before: tuple[datetime, uuid.UUID] | None = None,
        limit: int = 50,
    ) -> tuple[list[JobRow], int]:
        """A page of the tenant's jobs for A2A's ListTasks, and how many match in all."""
        params = {"tenant_id": str(tenant_id), "status": status, "key_prefix": key_prefix,
                  "changed_after": changed_after}  # fmt: skip
        total = int(await self._scalar("task_count", params))
        page = params | {"before_created": before[0] if before else None,
                         "before_id": before[1] if before else None, "limit": limit}  # fmt: skip
        return await self._typed("task_list", page, JobRow), total

    async def job_todos(self, job_id: uuid.UUID | str) -> list[Row]:
        return await self._all("job_todos", {"job_id": _uuid(job_id, "job")})

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

    async def job_cancel(self, job_id: uuid.UUID | str) -> JobRow:
        return await self._again_on_deadlock("job_cancel", {"job_id": _uuid(job_id, "job")})

    async def job_retry(self, job_id: uuid.UUID | str) -> JobRow:
        return await self._again_on_deadlock("job_retry", {"job_id": _uuid(job_id, "job")})

    async def job_gate(
        self, exclusive: Iterable[uuid.UUID | str], shared: Iterable[uuid.UUID | str] = ()
    ) -> int:
        """Take these jobs' gates for the rest of the transaction (service scope): exclusive
        for ``exclusive``, shared for the others.

        A transaction that calls more than one operation takes this first (migration
        20261128000600_job_gate): each operation takes its own gates, but one that asked for an
        exclusive gate after another had taken the shared one, or a gate after another
        operation's rows, could deadlock with another such transaction."""
        strong = sorted({str(j) for j in exclusive})
        weak = sorted({str(j) for j in shared} - set(strong))
        return int(await self._scalar("job_gate", {"exclusive": strong, "shared": weak}))

    async def job_attach(self, job_id: uuid.UUID | str, todos: Sequence[Mapping[str, Any]]) -> int:
        params = {"job_id": str(job_id), "todos": _jsonb(list(todos))}
        return int(await self._scalar("job_attach", params))

    async def job_trace_set(self, job_id: uuid.UUID | str, traceparent: str) -> bool:
        """Keep the W3C trace context of the request that created the job (first one wins)."""
        params = {"job_id": str(job_id), "traceparent": traceparent}
        return bool(await self._scalar("job_trace_set", params))

    async def job_traces(self, job_ids: Sequence[uuid.UUID | str]) -> dict[str, str]:
        """``{job_id: traceparent}`` of those jobs that were created with tracing on."""
        rows = await self._all("job_traces", {"ids": [str(j) for j in job_ids]})
        return {str(r["id"]): str(r["traceparent"]) for r in rows}

    # todos --------------------------------------------------------------------------------

    async def todo_get(self, todo_id: uuid.UUID | str) -> Row:
        row = await self._one("todo_get", {"todo_id": _uuid(todo_id, "ToDo")})
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
    ) -> list[TodoRow]:
        params = _claim_params(target, owner, limit, lease_seconds, tenant_cap)
        params.update(
            tenant_id=str(tenant_id) if tenant_id else None,
            actions=list(actions) if actions is not None else None,
        )
        return await self._typed("todo_claim", params, TodoRow)

    async def todo_complete_claim(
        self,
        items: Sequence[Mapping[str, Any]],
        *,
        target: str,
        owner: str,
        limit: int,
        lease_seconds: float = 60.0,
        tenant_cap: int | None = None,
    ) -> tuple[int, list[TodoRow]]:
        """Complete ``items`` (as :meth:`todo_complete`) and claim up to ``limit`` (as
        :meth:`todo_claim`) in one call: how many were completed, and the claimed rows."""
        from psycopg.rows import kwargs_row

        params = _claim_params(target, owner, limit, lease_seconds, tenant_cap)
        params["items"] = _jsonb(list(items))
        with translate():
            cur = self.conn.cursor(row_factory=kwargs_row(_done_and_todo))
            await cur.execute(sql.get("todo_complete_claim"), params)
            return _completed_and_claimed(await cur.fetchall())

    async def todo_complete(self, items: Sequence[Mapping[str, Any]]) -> int:
        return int(await self._scalar("todo_complete", {"items": _jsonb(list(items))}))

    async def todo_fail(
        self, items: Sequence[Mapping[str, Any]], *, backoff_base: float = 1.0
    ) -> int:
        params = {"items": _jsonb(list(items)), "backoff_base": backoff_base}
        return int(await self._scalar("todo_fail", params))

    async def todo_fail_unless_job_held(
        self,
        items: Sequence[Mapping[str, Any]],
        *,
        lock_wait: str = CLAIM_LOCK_WAIT,
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
        params = {"items": _jsonb(list(items)), "backoff_base": backoff_base}
        try:
            with translate():
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
        params = {"items": _jsonb(list(items)), "refusal": refusal, "max_refusals": max_refusals}
        return int(await self._scalar("todo_release", params))

    async def todo_snooze(self, todo_id: uuid.UUID | str, owner: str, until: datetime) -> bool:
        params = {"todo_id": str(todo_id), "owner": owner, "until": until}
        return bool(await self._scalar("todo_snooze", params))

    async def todo_extend(
        self, ids: Sequence[uuid.UUID | str], owner: str, lease_seconds: float
    ) -> int:
        params = {"ids": [str(i) for i in ids], "owner": owner, "lease_seconds": lease_seconds}
        return int(await self._scalar("todo_extend", params))

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

    async def todo_confirm(self, todo_id: uuid.UUID | str, *, approved: bool = True) -> Row:
        params = {"todo_id": _uuid(todo_id, "ToDo"), "approved": approved}
        return await self._first("todo_confirm", params)

    async def todo_note(self, todo_id: uuid.UUID | str, kind: str, data: Mapping[str, Any]) -> int:
        params = {"todo_id": _uuid(todo_id, "ToDo"), "kind": kind, "data": _jsonb(dict(data))}
        return int(await self._scalar("todo_note", params))

    # agents and desktop assignment --------------------------------------------------------

    async def agent_upsert(
        self, tenant_id: uuid.UUID | str, agent_key: str, name: str | None, actions: Sequence[str]
    ) -> Row:
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
    ) -> list[Row]:
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
        params = {"agent_key": agent_key, "items": _jsonb(list(items))}
        return int(await self._scalar("agent_complete", params))

    async def agent_fail(
        self, agent_key: str, items: Sequence[Mapping[str, Any]], *, backoff_base: float = 1.0
    ) -> int:
        params = {
            "agent_key": agent_key,
            "items": _jsonb(list(items)),
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
            "items": _jsonb(list(items)),
            "refusal": refusal,
            "max_refusals": max_refusals,
        }
        return int(await self._scalar("agent_release", params))

    async def agent_list(self, tenant_id: uuid.UUID | str, seen_seconds: float) -> list[Row]:
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

    # events -------------------------------------------------------------------------------

    async def event_list(
        self, job_id: uuid.UUID | str, after_id: int = 0, limit: int = 500
    ) -> list[Row]:
        params = {"job_id": _uuid(job_id, "job"), "after_id": after_id, "limit": limit}
        return await self._all("event_list", params)

    async def event_last(self, job_id: uuid.UUID | str) -> int:
        """The id of the job's latest visible event (0: none): a cursor to follow it from."""
        return int(await self._scalar("event_last", {"job_id": _uuid(job_id, "job")}))

    async def event_append(
        self,
        *,
        tenant_id: uuid.UUID | str,
        job_id: uuid.UUID | str,
        kind: str,
        data: Mapping[str, Any],
        todo_id: uuid.UUID | str | None = None,
        status: str | None = None,
    ) -> int:
        params = {
            "tenant_id": str(tenant_id),
            "job_id": str(job_id),
            "todo_id": str(todo_id) if todo_id else None,
            "kind": kind,
            "status": status,
            "data": _jsonb(dict(data)),
        }
        return int(await self._scalar("event_append", params))

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
        params = {"tenant_id": str(tenant_id), "key": key, "plan": _jsonb(plan), "ttl": ttl}
        await self._all("plan_cache_put", params)

    # schedules ----------------------------------------------------------------------------

    async def schedule_create(
        self, *, tenant_id: uuid.UUID | str, cron: str, time_zone: str, request: str | None,
        graph: Any, intent: str, todos: Sequence[Mapping[str, Any]], next_run_at: datetime,
        cap: int = SCHEDULE_CAP,
    ) -> Row:  # fmt: skip
        """A new schedule; a :class:`errors.ConflictError` when the tenant already has
        ``cap`` active schedules."""
        params = {
            "tenant_id": str(tenant_id), "cron": cron, "time_zone": time_zone, "request": request,
            "graph": None if graph is None else _jsonb(graph), "intent": intent,
            "todos": _jsonb(list(todos)), "next_run_at": next_run_at, "cap": cap,
        }  # fmt: skip
        return await self._first("schedule_create", params)

    async def schedule_get(self, schedule_id: uuid.UUID | str) -> Row:
        row = await self._one("schedule_get", {"schedule_id": _uuid(schedule_id, "schedule")})
        if row is None:
            raise errors.NotFoundError(
                f"The schedule {schedule_id} does not exist or is not yours."
            )
        return row

    async def schedule_list(self, tenant_id: uuid.UUID | str, limit: int = 200) -> list[Row]:
        return await self._all("schedule_list", {"tenant_id": str(tenant_id), "limit": limit})

    async def schedule_pause(
        self,
        schedule_id: uuid.UUID | str,
        *,
        paused: bool,
        next_run_at: datetime | None = None,
        cap: int = SCHEDULE_CAP,
    ) -> Row:
        """Pause or resume; resuming past the tenant's ``cap`` of active schedules is a
        :class:`errors.ConflictError`."""
        params = {
            "schedule_id": _uuid(schedule_id, "schedule"),
            "paused": paused,
            "next_run_at": next_run_at,
            "cap": cap,
        }
        return await self._first("schedule_pause", params)

    async def schedule_delete(self, schedule_id: uuid.UUID | str) -> None:
        await self._all("schedule_delete", {"schedule_id": _uuid(schedule_id, "schedule")})

    async def schedule_due(self, now: datetime, limit: int = 50) -> list[Row]:
        return await self._all("schedule_due", {"now": now, "limit": limit})

    async def schedule_fire(
        self,
        schedule_id: uuid.UUID | str,
        occurrence: datetime,
        next_run_at: datetime,
        budget: int | None = SCHEDULE_JOBS_PER_MINUTE,
    ) -> JobRow:
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

    async def metrics_snapshot(self) -> list[Row]:
        return await self._all("metrics_snapshot")

    async def metrics_top_tenants(self, limit: int) -> list[Row]:
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

    async def my_memberships(self) -> list[Row]:
        """The caller's tenants with their names and the caller's role (user scope)."""
        return await self._all("membership_mine_named")

    async def tenant_of_user(self, user_id: uuid.UUID | str) -> uuid.UUID | None:
        row = await self._one("tenant_of_user", {"user_id": str(user_id)})
        return None if row is None else uuid.UUID(str(row["tenant_id"]))


def _the_job(row: Mapping[str, Any] | None) -> str:
    if row is None:
        raise errors.CpaError("The query 'job_submit' answered no row, but it always answers one.")
    return str(next(iter(row.values())))


def _uuid(value: uuid.UUID | str, what: str) -> str:
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        raise errors.NotFoundError(f"The {what} id {value!r} is not a valid id.") from None


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
        call raises OperationalError, which :func:`translate` makes a 503."""

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

            with translate():
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
        with translate():
            async with self._connection(deadline, wait) as conn, conn.transaction():
                if first is not None:
                    await conn.execute(sql.get(first), params)
                yield Session(conn)

    def user(self, claims: Mapping[str, Any]) -> contextlib.AbstractAsyncContextManager[Session]:
        """A transaction as ``authenticated`` with these verified claims: request work, its
        statements bounded by ``statement_timeout`` = ``timeout`` and each answer by
        ``timeout`` plus a margin (a dead network is a 503 in about ``timeout`` s)."""
        params = {"claims": _jsonb(dict(claims)), **self._user_limits}
        return self._scope("session_user_scope", params, self._request_deadline)

    async def submit(self, claims: Mapping[str, Any], submission: Submission) -> str:
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

    async def _submit_as_one(self, claims: Mapping[str, Any], submission: Submission) -> str:
        params = {"claims": _jsonb(dict(claims)), **submission.params()}
        with rate_limited():
            async with self._connection(self._request_deadline) as conn:
                await conn.set_autocommit(True)
                cur = await conn.execute(sql.get("job_submit_as"), params)
                row = await cur.fetchone()
                await conn.set_autocommit(False)
        return _the_job(row)

    async def _submit_pipelined(self, claims: Mapping[str, Any], submission: Submission) -> str:
        from psycopg import AsyncPipeline

        if not AsyncPipeline.is_supported():  # a libpq without pipeline mode: three trips
            async with self.user(claims) as session:
                return await session.submit(submission)
        scope = {"claims": _jsonb(dict(claims)), **self._user_limits}
        params = submission.params()
        with rate_limited():
            async with self._connection(self._request_deadline) as conn:
                await conn.set_autocommit(True)
                async with conn.pipeline():  # its end sends the Sync and reads every answer
                    await conn.execute(sql.get("session_user_scope"), scope)
                    cur = await conn.execute(sql.get("job_submit"), params)
                row = await cur.fetchone()
                await conn.set_autocommit(False)
        return _the_job(row)

    async def claim(
        self,
        items: Sequence[Mapping[str, Any]],
        *,
        target: str,
        owner: str,
        limit: int,
        lease_seconds: float = 60.0,
        tenant_cap: int | None = None,
    ) -> tuple[int, list[TodoRow]]:
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
        params = _claim_params(target, owner, limit, lease_seconds, tenant_cap)
        name, factory = "todo_claim", cast(Any, class_row(TodoRow))
        if items:
            params["items"] = _jsonb(list(items))
            name, factory = "todo_complete_claim", kwargs_row(_done_and_todo)
        with translate():
            async with self._connection(SERVICE_DEADLINE) as conn:
                await conn.set_autocommit(True)
                async with conn.pipeline():  # its end sends the Sync and reads every answer
                    await conn.execute(sql.get("session_service_scope"), self._limits)
                    cur = conn.cursor(row_factory=factory)
                    await cur.execute(sql.get(name), params)
                await conn.set_autocommit(False)
                rows: list[Any] = await cur.fetchall()
        return _completed_and_claimed(rows) if items else (0, rows)

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
