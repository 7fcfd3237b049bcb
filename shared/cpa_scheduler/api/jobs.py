"""Job routes: create, read, list, cancel, retry, and the SSE progress stream."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Header, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from cpa_scheduler import (
    auth,
    errors,
    graph,
    intake,
    logs,
    protocol,
    ratelimit,
    service,
    store,
    tracing,
)
from cpa_scheduler import events as events_mod
from cpa_scheduler.api import problems
from cpa_scheduler.api.deps import (
    AppState,
    CurrentCaller,
    TenantHeader,
    UserSession,
    VerifiedClaims,
    get_caller,
    wanted_tenant,
)

log = logging.getLogger("cpa.api")
router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=problems.RESPONSES)


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
    status: graph.TodoStatus
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
    tenant_id: str | None = None
    created_by: str | None = Field(
        default=None, description="The owner's user id: the job's events go to its user topic."
    )
    status: graph.JobStatus
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
    import httpx  # deferred: only deployments with CPA_DISPATCH_URL kick

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
    claims: VerifiedClaims,
    background: BackgroundTasks,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
    x_cpa_tenant: TenantHeader = None,
) -> Any:
    configured = app.config.planner_configured
    wanted = wanted_tenant(claims, x_cpa_tenant)
    # The Postgres limiter counts inside the create call; Upstash counts afterwards.
    limiter = app.limiter
    limit = (
        (limiter.limit, limiter.window) if isinstance(limiter, ratelimit.PostgresLimiter) else None
    )
    in_sql = limit is not None
    tenant_id: str | None
    view: Any = None
    with tracing.span("cpa.job.create") as span:
        # One SQL call: tenant choice, create, trace context, rate limit and the answer, as
        # JSON text from what was inserted (no second query, no model validation here).
        call = intake.one_call(
            tenant_id=wanted, text=body.request, spec=body.graph, idempotency_key=idempotency_key,
            priority=body.priority, planner_configured=configured, force_planner=body.plan,
            time_zone=body.time_zone, run_at=body.run_at,
            traceparent=tracing.traceparent(span) if span is not None else None, rate_limit=limit,
        )  # fmt: skip
        if call is not None and in_sql:
            # The claims, the call and the commit in one round trip: committed before we answer.
            text = await app.store.submit(claims.for_database(), call)
        else:
            # A transaction as the caller: it commits before the answer is sent, so a client
            # reading its job right after finds it (see deps.UserSession).
            async with app.store.user(claims.for_database()) as session:
                if call is not None:  # Upstash counts outside the database, in this transaction
                    text = await session.submit(call)
                    head = json.loads(text)
                    await app.limiter.hit(str(head["tenant_id"]), session)
                else:  # a recurring request, or ToDos that depend on an agent being online
                    view = await _create_in_steps(
                        app, claims, session, body, idempotency_key, x_cpa_tenant, span
                    )
        if view is not None:
            tenant_id, job_id = str(view["tenant_id"]), str(view["id"])
        elif span is not None or not in_sql:
            head = json.loads(text)
            tenant_id, job_id = str(head["tenant_id"]), str(head["id"])
        else:
            tenant_id = job_id = None
        if span is not None:
            span.set_attribute("cpa.tenant_id", str(tenant_id))
            span.set_attribute("cpa.job_id", str(job_id))
    if tenant_id is not None:
        logs.annotate(tenant_id=tenant_id)
    if app.config.dispatch_url:
        background.add_task(_kick, app.config.dispatch_url, app.config.dispatch_secret)
    if view is not None:
        return view
    return Response(content=text, status_code=201, media_type="application/json")


async def _create_in_steps(
    app: service.Services,
    claims: auth.Claims,
    session: store.Session,
    body: JobCreate,
    idempotency_key: str | None,
    x_cpa_tenant: str | None,
    span: tracing.Span | None,
) -> dict[str, Any]:
    """``POST /v1/jobs`` for the requests that need the tenant before the create (a recurring
    request, ToDos kept only where an agent offers them, an Idempotency-Key)."""
    caller = await get_caller(claims, session, x_cpa_tenant)
    job = await intake.submit(
        session, tenant_id=caller.tenant_id, text=body.request, spec=body.graph,
        idempotency_key=idempotency_key, priority=body.priority,
        planner_configured=app.config.planner_configured, force_planner=body.plan,
        time_zone=body.time_zone, run_at=body.run_at, schedule_cap=app.config.schedule_cap,
    )  # fmt: skip
    await intake.keep_trace(session, job, span)
    # Counted last: the tenant's counter row stays locked only until this transaction
    # commits, and a refusal rolls the job back with it.
    await app.limiter.hit(str(caller.tenant_id), session)
    return intake.job_view(job, await session.job_todos(job.id))


@router.get("", response_model=JobPage)
async def list_jobs(
    caller: CurrentCaller,
    session: UserSession,
    status: graph.JobStatus | None = None,
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


class EventPage(BaseModel):
    """One answer of the JSON long-poll: the events after ``after``, in id order."""

    events: list[dict[str, Any]] = Field(
        description="Progress events (docs/events.schema.json), ordered by id."
    )
    last_event_id: int = Field(description="Pass as ?after= on the next call.")
    done: bool = Field(description="The job has ended and every event was delivered.")
    retry_ms: int = Field(description="Wait this long before the next call when events is empty.")


BOUND_SECONDS = 20.0  # a buffered answer (Lambda) closes after at most this long
POLL_SECONDS = 0.2
PAGE = 500  # events per read
RETRY_MS = 1000
MAX_ID = 2**63 - 1  # job_events.id is a bigint
_EVENTS_DOC = {
    200: {
        "content": {
            "text/event-stream": {},
            "application/json": {"schema": EventPage.model_json_schema()},
        },
        "description": "SSE (default), or with ?after= one JSON page of events.",
    },
    204: {"description": "The job has ended and nothing follows Last-Event-ID: stop reconnecting."},
}


def _event_id_schema(schema: dict[str, Any]) -> None:
    schema.pop("anyOf", None)
    schema.update(type="string", pattern="^[0-9]{1,19}$")


def _buffered_bound(request: Request, configured: float | None) -> float | None:
    """How long a buffered host lets one answer take, or None where the response streams.

    Mangum (Lambda) puts the invocation's event into the ASGI scope and sends nothing before
    the app returns, so a stream that waits for the job would never reach the client.
    """
    scope = request.scope
    if "aws.event" not in scope and configured is None:
        return None
    bound = configured if configured is not None else BOUND_SECONDS
    remaining = getattr(scope.get("aws.context"), "get_remaining_time_in_millis", None)
    if callable(remaining):
        bound = min(bound, remaining() / 1000 - 3)  # leave time to send the answer
    return max(bound, 0.5)


@router.get("/{job_id}/events", response_model=None, responses=_EVENTS_DOC)  # type: ignore[arg-type]
async def job_events(
    job_id: uuid.UUID,
    request: Request,
    app: AppState,
    verified: VerifiedClaims,
    last_event_id: Annotated[
        str | None,
        Header(
            description="SSE: resume after this event id.",
            json_schema_extra=_event_id_schema,
        ),
    ] = None,
    after: Annotated[
        int | None,
        Query(ge=0, le=MAX_ID, description="JSON long-poll: the events after this id."),
    ] = None,
    wait: Annotated[
        float, Query(ge=0, le=25, description="JSON long-poll: seconds to wait for an event.")
    ] = BOUND_SECONDS,
) -> Response:
    """Progress of a job: SSE resumable by ``Last-Event-ID``, or JSON long-polling with ``?after=``.

    Long-running hosts stream until the job ends. Behind a buffered host (Lambda) the stream
    answers within a bound (everything after ``Last-Event-ID``, then it closes) and the client
    reconnects with the last id it saw.
    """
    # No request-long session here: each poll is a short transaction of its own.
    claims = verified.for_database()
    try:
        start = int(last_event_id) if last_event_id else 0
        if not 0 <= start <= MAX_ID:
            raise ValueError(start)
    except ValueError:
        raise errors.InvalidError(
            f"Last-Event-ID {last_event_id!r} is not an event id; send the id: of the last "
            "event received, or no header to start from the beginning."
        ) from None
    bound = _buffered_bound(request, app.config.events_bound)

    async def poll(last: int) -> tuple[list[dict[str, Any]], bool]:
        """Events after ``last``, and whether the job has ended with them: nothing follows."""
        async with app.store.user(claims) as session:
            # The status first: a job's final status commits with its last events, so a job
            # already ended here has all its events visible to the read after it. Read the
            # other way round, an end committing in between would close the stream without them.
            terminal = (await session.job_get(job_id)).status in events_mod.TERMINAL
            rows = await session.event_list(job_id, last, PAGE)
        batch = [events_mod.view(r) for r in rows]
        return batch, events_mod.ends(batch, terminal=terminal, complete=len(rows) < PAGE)

    first, ended = await poll(after if after is not None else start)  # 404 unless visible
    if after is not None:
        return await _long_poll(poll, after, first, ended, min(wait, bound or wait))
    if ended and not first:
        return Response(status_code=204)  # EventSource stops reconnecting on 204

    async def stream() -> AsyncIterator[str]:
        batch, gone, last, beat = first, ended, start, time.monotonic()
        deadline = None if bound is None else time.monotonic() + bound
        chunk = f"retry: {RETRY_MS}\n\n"
        done = False
        try:
            while True:
                # One write per poll, not one per event: a client that has left makes the
                # first write fail, and every further write of the same batch would log
                # asyncio's "socket.send() raised exception." before the server notices.
                for event in batch:
                    last = event["id"]
                    chunk += f"id: {last}\nevent: {event['kind']}\ndata: {json.dumps(event)}\n\n"
                # The job's terminal event ends the stream only as its last event: an earlier
                # run's end (before a retry) is followed by the next run's events. Buffered:
                # deliver what there is; the client resumes from `last`.
                done = bool(
                    gone or (deadline is not None and (batch or time.monotonic() >= deadline))
                )
                if not batch and not done and time.monotonic() - beat > 15:
                    beat = time.monotonic()
                    chunk += ": heartbeat\n\n"
                if chunk:
                    yield chunk
                    chunk = ""
                if done:
                    return
                if not batch:
                    await asyncio.sleep(POLL_SECONDS)
                if await request.is_disconnected():
                    done = True
                    _hung_up(job_id, last)
                    return
                # Shielded: a hang-up cancels the stream at once, but a query cut off midway
                # would close its pooled connection (and log two warnings); it finishes alone.
                polled = asyncio.ensure_future(poll(last))
                polled.add_done_callback(_retrieved)
                batch, gone = await asyncio.shield(polled)
        except (asyncio.CancelledError, GeneratorExit):
            # Starlette cancels the stream as soon as the client disconnects.
            if not done:
                _hung_up(job_id, last)
            raise

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip


def _retrieved(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # the stream that awaited it is gone: nobody else will ask


def _hung_up(job_id: uuid.UUID, last: int) -> None:
    log.debug("events stream of job %s: the client left after event %s", job_id, last)


async def _long_poll(
    poll: Callable[[int], Awaitable[tuple[list[dict[str, Any]], bool]]],
    after: int,
    batch: list[dict[str, Any]],
    ended: bool,
    wait: float,
) -> JSONResponse:
    deadline = time.monotonic() + wait
    while not batch and not ended and time.monotonic() < deadline:
        await asyncio.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))
        batch, ended = await poll(after)
    last = batch[-1]["id"] if batch else after
    done = ended
    page = EventPage(events=batch, last_event_id=last, done=done, retry_ms=RETRY_MS)
    return JSONResponse(page.model_dump(), headers={"Cache-Control": "no-cache"})


def _encode_cursor(job: store.JobRow) -> str:
    raw = f"{job.created_at.isoformat()}|{job.id}"
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
