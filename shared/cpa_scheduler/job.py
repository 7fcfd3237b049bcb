"""The store's operations on jobs and their events (one transaction each, see :mod:`cpa_scheduler.store`)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from cpa_scheduler import errors, graph, query


class JobQueries(query.Queries):
    """Jobs: create, submit, read, cancel, retry, gates, attach, traces; and their events."""

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
    ) -> query.JobRow:
        return await self._job(
            "job_create",
            {
                "tenant_id": str(tenant_id),
                "request": request,
                "intent": intent,
                "todos": query._jsonb(list(todos)),
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
            query.Submission(
                tenant_id=tenant_id, todos=todos, request=request, intent=intent,
                idempotency_key=idempotency_key, priority=priority, run_at=run_at,
                time_zone=time_zone, traceparent=traceparent, rate_limit=rate_limit,
            )
        )  # fmt: skip

    async def submit(self, submission: query.Submission) -> str:
        """:meth:`job_submit` of a prepared :class:`query.Submission`, in this transaction."""
        with query.rate_limited():
            return str(await self._scalar("job_submit", submission.params()))

    async def job_by_idempotency_key(
        self, tenant_id: uuid.UUID | str, key: str
    ) -> query.JobRow | None:
        params = {"tenant_id": str(tenant_id), "key": key}
        return await self._typed_one("job_by_idempotency_key", params, query.JobRow)

    async def job_get(self, job_id: uuid.UUID | str) -> query.JobRow:
        job = await self._typed_one("job_get", {"job_id": query._uuid(job_id, "job")}, query.JobRow)
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
    ) -> list[query.JobRow]:
        return await self._typed(
            "job_list",
            {
                "tenant_id": str(tenant_id) if tenant_id else None,
                "status": status,
                "before_created": before[0] if before else None,
                "before_id": before[1] if before else None,
                "limit": limit,
            },
            query.JobRow,
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
    ) -> tuple[list[query.JobRow], int]:
        """A page of the tenant's jobs for A2A's ListTasks, and how many match in all."""
        params = {"tenant_id": str(tenant_id), "status": status, "key_prefix": key_prefix,
                  "changed_after": changed_after}  # fmt: skip
        total = int(await self._scalar("task_count", params))
        page = params | {"before_created": before[0] if before else None,
                         "before_id": before[1] if before else None, "limit": limit}  # fmt: skip
        return await self._typed("task_list", page, query.JobRow), total

    async def job_todos(self, job_id: uuid.UUID | str) -> list[query.Row]:
        return await self._all("job_todos", {"job_id": query._uuid(job_id, "job")})

    async def job_cancel(self, job_id: uuid.UUID | str) -> query.JobRow:
        return await self._again_on_deadlock("job_cancel", {"job_id": query._uuid(job_id, "job")})

    async def job_retry(self, job_id: uuid.UUID | str) -> query.JobRow:
        return await self._again_on_deadlock("job_retry", {"job_id": query._uuid(job_id, "job")})

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
        params = {"job_id": str(job_id), "todos": query._jsonb(list(todos))}
        return int(await self._scalar("job_attach", params))

    async def job_trace_set(self, job_id: uuid.UUID | str, traceparent: str) -> bool:
        """Keep the W3C trace context of the request that created the job (first one wins)."""
        params = {"job_id": str(job_id), "traceparent": traceparent}
        return bool(await self._scalar("job_trace_set", params))

    async def job_traces(self, job_ids: Sequence[uuid.UUID | str]) -> dict[str, str]:
        """``{job_id: traceparent}`` of those jobs that were created with tracing on."""
        rows = await self._all("job_traces", {"ids": [str(j) for j in job_ids]})
        return {str(r["id"]): str(r["traceparent"]) for r in rows}

    # events -------------------------------------------------------------------------------

    async def event_list(
        self, job_id: uuid.UUID | str, after_id: int = 0, limit: int = 500
    ) -> list[query.Row]:
        params = {"job_id": query._uuid(job_id, "job"), "after_id": after_id, "limit": limit}
        return await self._all("event_list", params)

    async def event_last(self, job_id: uuid.UUID | str) -> int:
        """The id of the job's latest visible event (0: none): a cursor to follow it from."""
        return int(await self._scalar("event_last", {"job_id": query._uuid(job_id, "job")}))

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
            "data": query._jsonb(dict(data)),
        }
        return int(await self._scalar("event_append", params))
