"""The scheduler's side of the agent protocol: one answer for every message, and desktop
assignment.

:func:`answer` gives each message type its meaning (a request or proposal becomes a job, a
route pins it to an agent, discover is answered with an offer, confirm approves, an agent's
report changes its ToDo) and replies with a typed message. Hosts parse the message, check who
sends it, and pass the caller's :class:`Context`; the HTTP route is such a host.

Desktop ToDos are never run by the dispatcher. An agent claims them (``agent_claim``: the
tenant's ToDos for the actions the agent offers, leased to the agent) and receives ``assign``
messages. It answers ``agree``, ``refuse``, ``inform``, ``done`` or ``failure``; :func:`apply`
turns each into the matching state change. The lease owner is the database's
(``private.agent_owner_v1``): the agent's operations take its id, and only rows show the owner.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cpa_scheduler import (
    catalogue,
    errors,
    graph,
    intake,
    intents,
    protocol,
    ratelimit,
    store,
    tracing,
)

log = logging.getLogger("cpa.agent")

SCHEDULER = "scheduler"
MAX_REFUSALS = 3
# The states a ToDo waits for its approval in (a confirm approves those not yet confirmed).
UNCONFIRMED: frozenset[graph.TodoStatus] = frozenset({"confirming", "waiting"})


async def claim(
    session: store.Session,
    *,
    tenant_id: uuid.UUID | str,
    agent_id: str,
    actions: Sequence[str] | None,
    limit: int = 10,
    lease_seconds: float = 300.0,
) -> list[protocol.Assign]:
    """Claim ready desktop ToDos for this agent and turn each into an ``assign`` message."""
    rows = await session.agent_claim(tenant_id, agent_id, actions, limit, lease_seconds)
    traces: dict[str, str] = {}
    if rows and tracing.active():
        traces = await session.job_traces(sorted({str(r["job_id"]) for r in rows}))
    assigns: list[protocol.Assign] = []
    results: dict[str, dict[str, Any]] = {}
    for row in rows:
        job_id = str(row["job_id"])
        try:
            if job_id not in results:
                results[job_id] = await session.todo_job_results(job_id)
            params = graph.resolve_refs(row["params"], results[job_id], row["key"])
        except errors.PermanentError as exc:
            # This transaction holds the ToDo (claimed without its job) and todo_fail locks the
            # job: a cancel holding the job and waiting for the ToDo would make a cycle. So wait
            # for the job only briefly; if someone holds it, leave the ToDo unassigned: that
            # cancel ends the job once this claim commits (the expired lease then ends the ToDo
            # cancelled), or the lease expires and a later claim fails the ToDo.
            failed = await session.todo_fail_unless_job_held(
                [{"id": str(row["id"]), "owner": row["lease_owner"], "error": exc.message}]
            )
            if failed is None:
                log.warning(
                    "agent claim: ToDo %s of job %s has $refs that cannot be resolved (%s), but "
                    "another transaction (a cancel?) holds the job, so it is not failed now; not "
                    "assigned; it ends when its lease expires",
                    row["id"], job_id, exc.message,
                )  # fmt: skip
            continue
        envelope: dict[str, Any] = {}
        traceparent = _assign_span(traces.get(job_id), row, agent_id)
        if traceparent is not None:
            envelope["trace_id"] = tracing.trace_id_of(traceparent)
        assigns.append(
            protocol.Assign(
                sender=SCHEDULER,
                receiver=agent_id,
                conversation_id=job_id,
                reply_by=row["lease_expires_at"],
                **envelope,
                payload=protocol.AssignPayload(
                    todo_id=str(row["id"]),
                    job_id=job_id,
                    key=row["key"],
                    action=row["action"],
                    params=params,
                    attempt=row["attempts"],
                    lease_expires_at=row["lease_expires_at"],
                    traceparent=traceparent,
                ),
            )
        )
    return assigns


def _assign_span(job_trace: str | None, row: dict[str, Any], agent_id: str) -> str | None:
    """A span in the job's trace for handing the ToDo to an agent; its context travels in the
    assign, and the agent's answer continues from it."""
    if job_trace is None:
        return None
    span = tracing.start(
        f"cpa.agent.assign {row['action']}",
        context=tracing.parent(job_trace),
        attributes={"cpa.todo_id": str(row["id"]), "cpa.job_id": str(row["job_id"]),
                    "cpa.action": row["action"], "cpa.agent": agent_id},
    )  # fmt: skip
    if span is None:
        return None
    span.end()
    return tracing.traceparent(span)


# --- every message's answer ----------------------------------------------------------------

Reply = protocol.Agree | protocol.Refuse | protocol.Inform | protocol.Offer
# What an agent reports about an assigned ToDo.
Report = protocol.Done | protocol.Failure | protocol.Agree | protocol.Refuse | protocol.Inform


@dataclass(frozen=True)
class Context:
    """Who sends a message, as the host verified it: their session (row-level security in
    force), their tenant, and what submitting a job needs."""

    session: store.Session
    tenant_id: uuid.UUID
    planner_configured: bool
    limiter: ratelimit.Limiter
    schedule_cap: int = store.SCHEDULE_CAP  # CPA_SCHEDULE_CAP: a recurring request makes one


async def answer(message: protocol.Message, ctx: Context) -> Reply:
    """The reply to any protocol message; errors the sender must fix raise a :class:`CpaError`."""
    match message:
        case protocol.Request(payload=p):
            return await _submit(
                message, ctx, text=p.text, spec=p.graph, key=p.idempotency_key, time_zone=_zone(p)
            )
        case protocol.Propose(payload=p):
            # A client's plan: validated, then run as an explicit graph (the agree names the job).
            return await _submit(message, ctx, text=p.request, spec=p.plan)
        case protocol.Route(payload=p):
            return await _route(message, ctx, p)
        case protocol.Discover(payload=p):
            offer = protocol.OfferPayload(
                agent_id=SCHEDULER,
                name="CPA Scheduler",
                actions=catalogue.default().names(p.target),
                intents=intents.default().names(),
            )
            return protocol.reply(message, protocol.Offer, offer)
        case protocol.Offer(payload=p):
            row = await ctx.session.agent_upsert(
                ctx.tenant_id, p.agent_id or message.sender, p.name, p.actions
            )
            return _agree(message, f"agent {row['agent_key']} registered")
        case protocol.Confirm(payload=p):
            return await _confirm(message, ctx.session, p)
        case protocol.Assign():
            return _refuse(
                message,
                "not_allowed",
                "Only the scheduler assigns ToDos; claim them with POST /v1/agents/claim.",
            )
        case protocol.Done() | protocol.Failure():
            return await apply(ctx.session, message)
        case protocol.Agree() | protocol.Refuse() | protocol.Inform():
            if message.payload.todo_id:
                return await apply(ctx.session, message)
            return _agree(message, "noted")  # about no ToDo: nothing to change


def _zone(request: protocol.RequestPayload) -> str:
    """The zone times in the text are read in: the user's, from the request's context."""
    return request.context.timezone if request.context else "UTC"


async def _submit(
    message: protocol.Message,
    ctx: Context,
    *,
    text: str | None,
    spec: protocol.GraphSpec | None,
    key: str | None = None,
    time_zone: str = "UTC",
) -> protocol.Agree | protocol.Refuse:
    """Create the job; agree naming it, or refuse with what the sender can change."""
    try:
        # A savepoint: a refused request (the rate limit is counted after the job is built, as
        # POST /v1/jobs does in SQL) must leave no job behind, while the reply still commits.
        async with ctx.session.conn.transaction():
            job = await _create(ctx, text=text, spec=spec, key=key, time_zone=time_zone)
            await ctx.limiter.hit(str(ctx.tenant_id), ctx.session)
    except (errors.InvalidError, errors.PlannerError, errors.RateLimitedError) as exc:
        return _refuse(message, exc.code, exc.message)
    job_id = str(job.id)
    return _agree(message, f"intent {job.intent}", job_id=job_id, conversation_id=job_id)


async def _create(
    ctx: Context,
    *,
    text: str | None,
    spec: protocol.GraphSpec | None,
    key: str | None,
    time_zone: str,
) -> store.JobRow:
    with tracing.span("cpa.job.create", attributes={"cpa.tenant_id": str(ctx.tenant_id)}) as span:
        job = await intake.submit(
            ctx.session,
            tenant_id=ctx.tenant_id,
            text=text,
            spec=spec,
            idempotency_key=key,
            planner_configured=ctx.planner_configured,
            time_zone=time_zone,
            schedule_cap=ctx.schedule_cap,
        )
        await intake.keep_trace(ctx.session, job, span)
    return job


async def _route(
    message: protocol.Route, ctx: Context, p: protocol.RoutePayload
) -> protocol.Agree | protocol.Refuse:
    """Submit the embedded request, then pin its desktop ToDos to the named agent's queue."""
    if p.request is None:
        return _refuse(message, "invalid", "A route must embed a request.")
    request = p.request
    reply = await _submit(
        message,
        ctx,
        text=request.text,
        spec=request.graph,
        key=request.idempotency_key,
        time_zone=_zone(request),
    )
    job_id = reply.payload.job_id if isinstance(reply, protocol.Agree) else None
    if job_id is None:
        return reply
    # Only the named agent may claim them now.
    pinned = await ctx.session.job_route(job_id, p.to_agent)
    return _agree(
        message, f"{pinned} ToDo(s) routed to {p.to_agent}", job_id=job_id, conversation_id=job_id
    )


async def _confirm(
    message: protocol.Confirm, session: store.Session, p: protocol.ConfirmPayload
) -> protocol.Inform:
    """Approve or decline one ToDo, or every ToDo of the job still waiting for approval."""
    if p.todo_id:
        ids = [p.todo_id]
    elif p.job_id is not None:
        ids = [
            str(t["id"])
            for t in await session.job_todos(p.job_id)
            if t["status"] in UNCONFIRMED
            and t["requires_confirmation"]
            and t["confirmed_at"] is None
        ]
    else:
        raise errors.ProtocolError("A confirm must name the ToDo (todo_id) or the job (job_id).")
    for todo_id in ids:
        await session.todo_confirm(todo_id, approved=p.approved)
    verb = "approved" if p.approved else "declined"
    inform = protocol.InformPayload(
        job_id=p.job_id, todo_id=p.todo_id, text=f"{len(ids)} ToDo(s) {verb}"
    )
    return protocol.reply(message, protocol.Inform, inform)


def _agree(
    message: protocol.Message,
    text: str,
    *,
    job_id: str | None = None,
    todo_id: str | None = None,
    conversation_id: str | None = None,
) -> protocol.Agree:
    payload = protocol.AgreePayload(job_id=job_id, todo_id=todo_id, text=text)
    return protocol.reply(message, protocol.Agree, payload, conversation_id=conversation_id)


def _refuse(
    message: protocol.Message, code: str, reason: str, *, todo_id: str | None = None
) -> protocol.Refuse:
    payload = protocol.RefusePayload(code=code, reason=reason, todo_id=todo_id)
    return protocol.reply(message, protocol.Refuse, payload)


def _inform(message: protocol.Message, text: str, *, todo_id: str) -> protocol.Inform:
    return protocol.reply(
        message, protocol.Inform, protocol.InformPayload(todo_id=todo_id, text=text)
    )


# --- an agent's report on its ToDo ------------------------------------------------------------


async def apply(
    session: store.Session, message: Report
) -> protocol.Agree | protocol.Refuse | protocol.Inform:
    """Apply an agent's report on an assigned ToDo; answers ``agree``, ``inform`` or ``refuse``."""
    match message:
        case protocol.Done(payload=p):
            item = {"id": p.todo_id, "result": p.result}
            if await session.agent_complete(message.sender, [item]):
                return _agree(message, "done", todo_id=p.todo_id)
            return await _stale(session, message, p.todo_id)
        case protocol.Failure(payload=p):
            item = {"id": p.todo_id, "error": p.error, "retryable": p.retryable}
            if await session.agent_fail(message.sender, [item]):
                return _agree(message, "failed", todo_id=p.todo_id)
            return await _stale(session, message, p.todo_id)
        case protocol.Refuse(payload=p) if p.todo_id:
            released = await session.agent_release(
                message.sender, [{"id": p.todo_id}], refusal=True, max_refusals=MAX_REFUSALS
            )
            if not released:
                return await _stale(session, message, p.todo_id)
            await session.todo_note(
                p.todo_id, "agent.refuse", {"agent": message.sender, "reason": p.reason}
            )
            return _inform(message, "released for another agent", todo_id=p.todo_id)
        case protocol.Agree(payload=p) if p.todo_id:
            await session.todo_note(p.todo_id, "agent.agree", {"agent": message.sender})
            return _inform(message, "recorded", todo_id=p.todo_id)
        case protocol.Inform(payload=p) if p.todo_id:
            data = {"agent": message.sender, "text": p.text, **p.data}
            await session.todo_note(p.todo_id, "agent.inform", data)
            return _agree(message, "recorded", todo_id=p.todo_id)
    raise errors.ProtocolError(
        f"A {message.type!r} message must name the ToDo it is about (payload.todo_id)."
    )


async def _stale(
    session: store.Session, message: Report, todo_id: str
) -> protocol.Agree | protocol.Refuse:
    """The answer to a report on a ToDo the sender no longer holds: a repeated done is
    harmless, anything else is refused."""
    todo = await session.todo_get(todo_id)
    if message.type == "done" and todo["status"] == "done":
        return _agree(message, "already done", todo_id=todo_id)
    reason = (
        f"The ToDo {todo['key']!r} is {todo['status']} and not leased to {message.sender!r}; "
        "claim it again before reporting."
    )
    return _refuse(message, "lease_not_held", reason, todo_id=todo_id)
