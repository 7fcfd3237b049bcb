"""The A2A request handler: the ``a2a-sdk``'s :class:`RequestHandler` over jobs.

The SDK's JSON-RPC dispatcher parses and answers the calls; each method here composes the
core (intake, the store's request sessions, the job events) as the REST routes do: the SQL runs
as ``authenticated`` with the caller's verified claims, job creation counts against the rate
limit, and a repeated message id answers the job it made. Imported on the first A2A call only,
so the API function's cold import stays without the SDK.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from a2a.server.context import ServerCallContext
from a2a.server.request_handlers.request_handler import RequestHandler, validate_request_params
from a2a.server.routes.common import ServerCallContextBuilder
from a2a.server.routes.jsonrpc_dispatcher import JsonRpcDispatcher
from a2a.types import a2a_pb2 as pb
from a2a.utils import errors as a2a_errors
from fastapi import Request
from starlette.exceptions import HTTPException

from cpa_scheduler import (
    a2a_tasks,
    agent,
    auth,
    errors,
    intake,
    metrics,
    protocol,
    service,
    store,
    tracing,
)
from cpa_scheduler import events as events_mod
from cpa_scheduler.api import deps

POLL_SECONDS = 0.2
SEND_WAIT = 20.0  # SendMessage waits this long at most for a terminal or input-required state
LAST_EVENT_ID = "last-event-id"


@dataclass(frozen=True)
class Call:
    """The verified caller of one A2A request, as the route's dependencies made it."""

    services: service.Services
    claims: auth.Claims
    tenant: str | None  # X-CPA-Tenant
    bound: float | None  # a buffered host (Lambda): seconds one answer may take
    kick: Callable[[], None]

    def session(self) -> contextlib.AbstractAsyncContextManager[store.Session]:
        return self.services.store.user(self.claims.for_database())


class Refused(HTTPException):
    """A domain error the HTTP layer answers (rate limit, unavailable database): the SDK's
    dispatcher passes HTTP exceptions on, and the route answers its problem+json."""

    def __init__(self, error: errors.CpaError) -> None:
        super().__init__(status_code=error.status, detail=error.message)
        self.error = error


class CallContext(ServerCallContextBuilder):
    """Hands the route's verified caller to the handler."""

    def build(self, request: Request) -> ServerCallContext:
        return ServerCallContext(
            state={"headers": dict(request.headers), "call": request.state.a2a_call}
        )


@contextlib.contextmanager
def _answering(method: str) -> Iterator[None]:
    """Count the call, and turn domain errors into the spec's errors (or HTTP answers)."""
    outcome = "ok"
    try:
        with tracing.span(f"cpa.a2a {method}"):
            yield
    except errors.CpaError as exc:
        if isinstance(exc, errors.RateLimitedError | errors.UnavailableError):
            outcome = str(exc.status)
            raise Refused(exc) from None
        error = a2a_tasks.error_of(exc)
        outcome = str(a2a_errors.JSON_RPC_ERROR_CODE_MAP.get(type(error), -32603))
        raise error from None
    except a2a_errors.A2AError as exc:
        outcome = str(a2a_errors.JSON_RPC_ERROR_CODE_MAP.get(type(exc), -32603))
        raise
    finally:
        metrics.instruments().a2a_requests.labels(method, outcome).inc()


def _job_id(task_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(task_id)
    except ValueError:
        raise a2a_errors.TaskNotFoundError(message=f"There is no task {task_id!r}.") from None


async def _snapshot(session: store.Session, job_id: uuid.UUID) -> tuple[pb.Task, list[Any]]:
    job = await session.job_get(job_id)
    todos = await session.job_todos(job_id)
    return a2a_tasks.task(job, todos), todos


class JobTasks(RequestHandler):
    """A2A tasks that are jobs (see :mod:`cpa_scheduler.a2a_tasks`)."""

    @validate_request_params
    async def on_get_task(self, params: pb.GetTaskRequest, context: ServerCallContext) -> pb.Task:
        call: Call = context.state["call"]
        with _answering("GetTask"):
            async with call.session() as session:
                return (await _snapshot(session, _job_id(params.id)))[0]

    @validate_request_params
    async def on_cancel_task(
        self, params: pb.CancelTaskRequest, context: ServerCallContext
    ) -> pb.Task:
        call: Call = context.state["call"]
        with _answering("CancelTask"):
            async with call.session() as session:
                job_id = _job_id(params.id)
                job = await session.job_get(job_id)
                if job.status in events_mod.TERMINAL:  # the spec: a finished task is not
                    raise a2a_errors.TaskNotCancelableError(  # cancelable (REST: idempotent)
                        message=f"The task has ended ({job.status}); there is nothing to cancel."
                    )
                try:
                    await session.job_cancel(job_id)
                except errors.ConflictError as exc:
                    raise a2a_errors.TaskNotCancelableError(message=exc.message) from None
                return (await _snapshot(session, job_id))[0]

    @validate_request_params
    async def on_message_send(
        self, params: pb.SendMessageRequest, context: ServerCallContext
    ) -> pb.Task:
        call: Call = context.state["call"]
        with _answering("SendMessage"):
            snapshot, _, _ = await _accept(call, params.message)
            if params.configuration.return_immediately:
                return snapshot
            return await _settled(call, snapshot)

    @validate_request_params
    async def on_message_send_stream(
        self, params: pb.SendMessageRequest, context: ServerCallContext
    ) -> AsyncGenerator[a2a_tasks.Event | pb.Task]:
        call: Call = context.state["call"]
        with _answering("SendStreamingMessage"):
            snapshot, todos, after = await _accept(call, params.message)
        yield snapshot
        async for event in _follow(call, snapshot, todos, after):
            yield event

    @validate_request_params
    async def on_subscribe_to_task(
        self, params: pb.SubscribeToTaskRequest, context: ServerCallContext
    ) -> AsyncGenerator[a2a_tasks.Event | pb.Task]:
        call: Call = context.state["call"]
        with _answering("SubscribeToTask"):
            job_id = _job_id(params.id)
            async with call.session() as session:
                after = await session.event_last(job_id)  # first: the snapshot covers it
                snapshot, todos = await _snapshot(session, job_id)
            # Resuming after a drop: the events after the last one the caller saw.
            after = _resume_from(context, after)
        yield snapshot
        async for event in _follow(call, snapshot, todos, after):
            yield event

    @validate_request_params
    async def on_list_tasks(
        self, params: pb.ListTasksRequest, context: ServerCallContext
    ) -> pb.ListTasksResponse:
        call: Call = context.state["call"]
        with _answering("ListTasks"):
            query = a2a_tasks.listing(params)
            async with call.session() as session:
                caller = await deps.get_caller(call.claims, session, call.tenant)
                jobs, total = await session.task_list(tenant_id=caller.tenant_id, **query)
                tasks = [a2a_tasks.task(j, await session.job_todos(j.id)) for j in jobs]
            last = jobs[-1] if len(jobs) == query["limit"] else None
            return pb.ListTasksResponse(
                tasks=tasks, page_size=query["limit"], total_size=total,
                next_page_token=a2a_tasks.page_token(last.created_at, last.id) if last else "",
            )  # fmt: skip

    async def on_create_task_push_notification_config(
        self, params: pb.TaskPushNotificationConfig, context: ServerCallContext
    ) -> pb.TaskPushNotificationConfig:
        raise a2a_errors.PushNotificationNotSupportedError

    async def on_get_task_push_notification_config(
        self, params: pb.GetTaskPushNotificationConfigRequest, context: ServerCallContext
    ) -> pb.TaskPushNotificationConfig:
        raise a2a_errors.PushNotificationNotSupportedError

    async def on_list_task_push_notification_configs(
        self, params: pb.ListTaskPushNotificationConfigsRequest, context: ServerCallContext
    ) -> pb.ListTaskPushNotificationConfigsResponse:
        raise a2a_errors.PushNotificationNotSupportedError

    async def on_delete_task_push_notification_config(
        self, params: pb.DeleteTaskPushNotificationConfigRequest, context: ServerCallContext
    ) -> None:
        raise a2a_errors.PushNotificationNotSupportedError

    async def on_get_extended_agent_card(
        self, params: pb.GetExtendedAgentCardRequest, context: ServerCallContext
    ) -> pb.AgentCard:
        raise a2a_errors.ExtendedAgentCardNotConfiguredError


def _resume_from(context: ServerCallContext, default: int) -> int:
    """``Last-Event-ID`` (the ``metadata["cpa.event_id"]`` of the last event received), else
    ``default``."""
    given = context.state["headers"].get(LAST_EVENT_ID)
    if given is None:
        return default
    if not given.isdigit() or int(given) > 2**63 - 1:
        raise a2a_errors.InvalidParamsError(
            message=f"Last-Event-ID {given!r} is not an event id; send the cpa.event_id of "
            "the last event received."
        )
    return int(given)


async def _accept(call: Call, message: pb.Message) -> tuple[pb.Task, list[Any], int]:
    """A new task from the message, or the caller's answer to its input-required task; the
    task, its ToDos and the event cursor to follow it from."""
    if message.task_id:
        return await _answer(call, message)
    ask = a2a_tasks.ask_of(message)
    async with call.session() as session:
        caller = await deps.get_caller(call.claims, session, call.tenant)
        with tracing.span("cpa.job.create", attributes={"cpa.tenant_id": str(caller.tenant_id)}) as span:  # fmt: skip
            job = await intake.submit(
                session, tenant_id=caller.tenant_id, text=ask.text, spec=ask.graph,
                idempotency_key=ask.key, planner_configured=call.services.config.planner_configured,
                time_zone=ask.time_zone,
            )  # fmt: skip
            await intake.keep_trace(session, job, span)
        # Counted last, as POST /v1/jobs does: a refusal rolls the job back with it.
        await call.services.limiter.hit(str(caller.tenant_id), session)
        todos = await session.job_todos(job.id)
    call.kick()
    return a2a_tasks.task(job, todos), todos, 0


async def _answer(call: Call, message: pb.Message) -> tuple[pb.Task, list[Any], int]:
    """The caller's next message to an input-required task approves or declines its ToDos
    (the ``confirm`` flow of the agent protocol)."""
    job_id = _job_id(message.task_id)
    async with call.session() as session:
        after = await session.event_last(job_id)
        snapshot, todos = await _snapshot(session, job_id)
        if snapshot.status.state != pb.TASK_STATE_INPUT_REQUIRED:
            state = pb.TaskState.Name(snapshot.status.state)
            raise a2a_errors.UnsupportedOperationError(
                message=f"The task is {state} and waits for no input; send a message without "
                "taskId to start a new task."
            )
        approved = a2a_tasks.approval_of(message)
        caller = await deps.get_caller(call.claims, session, call.tenant)
        sender = agent.Context(session, caller.tenant_id,
                               call.services.config.planner_configured, call.services.limiter)  # fmt: skip
        for todo in a2a_tasks.awaiting(todos):  # exactly the ToDos the question named
            confirm = protocol.Confirm(
                sender=f"a2a:{call.claims.sub}", receiver=agent.SCHEDULER,
                conversation_id=str(job_id),
                payload=protocol.ConfirmPayload(todo_id=str(todo["id"]), approved=approved),
            )  # fmt: skip
            await agent.answer(confirm, sender)
        snapshot, todos = await _snapshot(session, job_id)
    call.kick()
    return snapshot, todos, after


async def _settled(call: Call, snapshot: pb.Task) -> pb.Task:
    """The task once it is terminal or waits for input, or as it is after the wait's bound."""
    deadline = time.monotonic() + min(SEND_WAIT, call.bound or SEND_WAIT)
    job_id = uuid.UUID(snapshot.id)
    while (
        snapshot.status.state not in a2a_tasks.TERMINAL
        and snapshot.status.state != pb.TASK_STATE_INPUT_REQUIRED
        and time.monotonic() < deadline
    ):
        await asyncio.sleep(POLL_SECONDS)
        async with call.session() as session:
            snapshot = (await _snapshot(session, job_id))[0]
    return snapshot


async def _follow(
    call: Call, snapshot: pb.Task, todos: list[Any], after: int
) -> AsyncIterator[a2a_tasks.Event]:
    """The task's events after the cursor ``after`` until its terminal event (or, behind a
    buffered host, the bound: the caller resubscribes with the last cpa.event_id)."""
    follower = a2a_tasks.Follower.of(snapshot, todos)  # a finished task: the snapshot says all
    job_id = uuid.UUID(snapshot.id)
    deadline = None if call.bound is None else time.monotonic() + call.bound
    while not follower.ended:
        async with call.session() as session:
            # The status first, as the events route does: an end committed before this read
            # has all its events visible to the read after it.
            ended = (await session.job_get(job_id)).status in events_mod.TERMINAL
            rows = await session.event_list(job_id, after, 500)
        for event in follower.events(rows):
            yield event
        if rows:
            after = int(rows[-1]["id"])
        elif ended or (deadline is not None and time.monotonic() >= deadline):
            return
        else:
            await asyncio.sleep(POLL_SECONDS)


@dataclass
class _Holder:
    dispatcher: JsonRpcDispatcher | None = None


_holder = _Holder()


def dispatcher() -> JsonRpcDispatcher:
    """The SDK's JSON-RPC dispatcher over :class:`JobTasks` (one per process)."""
    if _holder.dispatcher is None:
        _holder.dispatcher = JsonRpcDispatcher(JobTasks(), context_builder=CallContext())
    return _holder.dispatcher
