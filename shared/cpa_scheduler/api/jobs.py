"""Job routes: create, read, list, cancel, retry, and the SSE progress stream."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any, Literal

import httpx
from fastapi import APIRouter, BackgroundTasks, Header, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from cpa_scheduler import errors, intake, protocol
from cpa_scheduler.api import problems
from cpa_scheduler.api.deps import AppState, CurrentCaller, UserSession, VerifiedClaims

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=problems.RESPONSES)
Status = Literal["pending", "running", "done", "failed", "cancelled"]
TERMINAL = {"done", "failed", "cancelled"}


class JobCreate(BaseModel):
    """Either a request text (routed, or planned) or an explicit graph."""

    model_config = ConfigDict(extra="forbid")

    request: str | None = Field(default=None, min_length=1, max_length=4000)
    graph: protocol.GraphSpec | None = None
    priority: int = Field(default=0, ge=0, le=10)
    plan: bool = Field(default=False, description="Skip the intent router and ask the LLM planner.")
    time_zone: str = Field(
        default="UTC",
        min_length=1,
        max_length=64,
        description="IANA zone the times in `request` are read in, e.g. Europe/Berlin.",
    )
    run_at: AwareDatetime | None = Field(
        default=None, description="Earliest start of every ToDo, RFC 3339 with an offset."
    )

    @model_validator(mode="after")
    def _one(self) -> JobCreate:
        if (self.request is None) == (self.graph is None):
            raise ValueError("give exactly one of 'request' or 'graph'")
        return self


class TodoOut(BaseModel):
    id: str
    key: str
    action: str
    target: str
    status: str
    depends_on: list[str]
    params: dict[str, Any]
    result: Any = None
    error: str | None = None
    attempts: int
    started_at: datetime | None = None
    finished_at: datetime | None = None
    requires_confirmation: bool = False
    run_at: datetime | None = None


class JobOut(BaseModel):
    id: str
    status: Status
    request: str | None = None
    intent: str | None = None
    error: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    completed_at: datetime | None = None
    run_at: datetime | None = None
    schedule_id: str | None = None
    todos: list[TodoOut] = []


class JobPage(BaseModel):
    jobs: list[JobOut]
    next_cursor: str | None = None


async def _kick(url: str, secret: str | None) -> None:
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    try:
        async with httpx.AsyncClient(timeout=2.0) as client:
            await client.post(url, headers=headers, json={"source": "api"})
    except httpx.HTTPError:
        pass  # the schedule picks the job up anyway


@router.post("", status_code=201, response_model=JobOut)
async def create_job(
    body: JobCreate,
    app: AppState,
    caller: CurrentCaller,
    session: UserSession,
    background: BackgroundTasks,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> dict[str, Any]:
    configured = bool(app.config.openai_api_key or app.config.openai_base_url)
    job = await intake.submit(
        session, tenant_id=caller.tenant_id, text=body.request, spec=body.graph,
        idempotency_key=idempotency_key, priority=body.priority, planner_configured=configured,
        force_planner=body.plan, time_zone=body.time_zone, run_at=body.run_at,
    )  # fmt: skip
    # Counted last: the tenant's counter row stays locked only until this transaction commits,
    # and a refusal rolls the job back with it.
    await app.limiter.hit(str(caller.tenant_id), session)
    if app.config.dispatch_url:
        background.add_task(_kick, app.config.dispatch_url, app.config.dispatch_secret)
    return intake.job_view(job, await session.job_todos(job["id"]))


@router.get("", response_model=JobPage)
async def list_jobs(
    caller: CurrentCaller,
    session: UserSession,
    status: Status | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> dict[str, Any]:
    before = _decode_cursor(cursor) if cursor else None
    rows = await session.job_list(
        tenant_id=caller.tenant_id, status=status, before=before, limit=limit
    )
    nxt = _encode_cursor(rows[-1]) if len(rows) == limit else None
    return {"jobs": [intake.job_view(r, []) for r in rows], "next_cursor": nxt}


@router.get("/{job_id}", response_model=JobOut)
async def get_job(job_id: uuid.UUID, caller: CurrentCaller, session: UserSession) -> dict[str, Any]:
    return intake.job_view(await session.job_get(job_id), await session.job_todos(job_id))


@router.post("/{job_id}/cancel", response_model=JobOut)
async def cancel_job(
    job_id: uuid.UUID, caller: CurrentCaller, session: UserSession
) -> dict[str, Any]:
    await session.job_get(job_id)
    job = await session.job_cancel(job_id)
    return intake.job_view(job, await session.job_todos(job_id))


@router.post("/{job_id}/retry", response_model=JobOut)
async def retry_job(
    job_id: uuid.UUID, caller: CurrentCaller, session: UserSession
) -> dict[str, Any]:
    await session.job_get(job_id)
    job = await session.job_retry(job_id)
    return intake.job_view(job, await session.job_todos(job_id))


@router.get("/{job_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}})  # fmt: skip
async def job_events(
    job_id: uuid.UUID,
    request: Request,
    app: AppState,
    verified: VerifiedClaims,
    last_event_id: Annotated[str | None, Header()] = None,
    after: Annotated[int | None, Query(ge=0)] = None,
) -> StreamingResponse:
    # No request-long session here: the stream opens a short transaction per poll.
    claims = verified.for_database()
    async with app.store.user(claims) as session:
        await session.job_get(job_id)  # 404 unless the caller's tenant owns it
    try:
        start = int(last_event_id) if last_event_id else (after or 0)
    except ValueError:
        raise errors.InvalidError(f"Last-Event-ID {last_event_id!r} is not an event id.") from None

    async def stream() -> AsyncIterator[str]:
        last, beat = start, time.monotonic()
        yield "retry: 1000\n\n"
        while not await request.is_disconnected():
            async with app.store.user(claims) as session:
                rows = await session.event_list(job_id, last, 500)
                job = None if rows else await session.job_get(job_id)
            for row in rows:
                last = int(row["id"])
                data = {"id": last, "job_id": str(row["job_id"]), "kind": row["kind"],
                        "status": row["status"], "data": row["data"],
                        "todo_id": str(row["todo_id"]) if row["todo_id"] else None,
                        "created_at": row["created_at"].isoformat()}  # fmt: skip
                yield f"id: {last}\nevent: {row['kind']}\ndata: {json.dumps(data)}\n\n"
                if row["kind"] == "job.status" and row["status"] in TERMINAL:
                    return
            if job is not None and job["status"] in TERMINAL:
                return
            if not rows:
                if time.monotonic() - beat > 15:
                    beat = time.monotonic()
                    yield ": heartbeat\n\n"
                await asyncio.sleep(0.2)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip


def _encode_cursor(row: dict[str, Any]) -> str:
    raw = f"{row['created_at'].isoformat()}|{row['id']}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, _, ident = raw.partition("|")
        when = datetime.fromisoformat(created)
        if when.tzinfo is None:
            raise ValueError("naive")
        return when, uuid.UUID(ident)
    except (ValueError, UnicodeDecodeError):
        raise errors.InvalidError(f"The cursor {cursor!r} is not one this API issued.") from None
