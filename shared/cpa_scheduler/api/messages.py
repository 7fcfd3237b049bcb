"""The protocol endpoint (every message type has a defined answer) and the agent claim."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Request
from pydantic import BaseModel, ConfigDict, Field

from cpa_scheduler import agent, catalogue, errors, intake, intents, protocol, store, tracing
from cpa_scheduler.api import problems
from cpa_scheduler.api import state as state_mod
from cpa_scheduler.api.deps import AppState, Caller, CurrentCaller, UserSession

router = APIRouter(tags=["agents"], responses=problems.RESPONSES)
SCHEDULER = agent.SCHEDULER


class ClaimBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    agent_id: str = Field(min_length=1, max_length=200)
    actions: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(
        default=None, max_length=100
    )
    limit: int = Field(default=10, ge=1, le=50)


@router.post("/v1/agents/claim")
async def claim(
    body: ClaimBody, caller: CurrentCaller, session: UserSession
) -> list[dict[str, Any]]:
    """Claim desktop ToDos for an agent; answers ``assign`` messages."""
    assigns = await agent.claim(
        session, tenant_id=caller.tenant_id, agent_id=body.agent_id, actions=body.actions,
        limit=body.limit,
    )  # fmt: skip
    return [protocol.dump(a) for a in assigns]


@router.post("/v1/messages")
async def message(
    raw: Annotated[dict[str, Any], Body(description="Any protocol message.")],
    request: Request,
    app: AppState,
    caller: CurrentCaller,
    session: UserSession,
) -> dict[str, Any]:
    """Any protocol message in; a protocol message out."""
    msg = protocol.parse(raw)
    # A traceparent header already parents this request's span; without one, the message's
    # own trace_id names the trace (an agent answering an assign echoes the job's).
    parent = None
    if "traceparent" not in request.headers:
        parent = tracing.parent_from_trace_id(msg.trace_id, msg.id)
    if parent is None:
        return protocol.dump(await answer(msg, app, caller, session))
    with tracing.span(f"cpa.message {msg.type}", context=parent,
                      attributes={"cpa.message_id": msg.id}):  # fmt: skip
        return protocol.dump(await answer(msg, app, caller, session))


async def answer(
    msg: protocol.Message, app: state_mod.State, caller: Caller, session: store.Session
) -> protocol.Message:
    configured = app.config.planner_configured
    match msg:
        case protocol.Request(payload=p):
            return await _submit(
                msg, app, session, caller, p.text, p.graph, p.idempotency_key, configured,
                p.context.timezone if p.context else "UTC",
            )  # fmt: skip
        case protocol.Propose(payload=p):
            # A client's plan: validated, then run as an explicit graph (the agree names the job).
            return await _submit(msg, app, session, caller, p.request, p.plan, None, configured)
        case protocol.Route(payload=p):
            if p.request is None:
                return protocol.reply_to(
                    msg, "refuse", {"code": "invalid", "reason": "A route must embed a request."}
                )
            reply = await _submit(
                msg,
                app,
                session,
                caller,
                p.request.text,
                p.request.graph,
                p.request.idempotency_key,
                configured,
                p.request.context.timezone if p.request.context else "UTC",
            )
            if isinstance(reply, protocol.Agree) and reply.payload.job_id:
                # Forward to the named agent's queue: only it may claim the desktop ToDos.
                pinned = await session.job_route(reply.payload.job_id, p.to_agent)
                return protocol.reply_to(
                    msg, "agree",
                    {"job_id": reply.payload.job_id, "text": f"{pinned} ToDo(s) routed to {p.to_agent}"},
                    conversation_id=reply.payload.job_id,
                )  # fmt: skip
            return reply
        case protocol.Discover(payload=p):
            actions = catalogue.default().names(p.target)
            return protocol.reply_to(msg, "offer", {"agent_id": SCHEDULER, "name": "CPA Scheduler",
                                                    "actions": actions, "intents": intents.default().names()})  # fmt: skip
        case protocol.Offer(payload=p):
            row = await session.agent_upsert(
                caller.tenant_id, p.agent_id or msg.sender, p.name, p.actions
            )
            return protocol.reply_to(msg, "agree", {"text": f"agent {row['agent_key']} registered"})
        case protocol.Confirm(payload=p):
            return await _confirm(msg, session, p)
        case protocol.Assign():
            return protocol.reply_to(msg, "refuse", {"code": "not_allowed",
                                                     "reason": "Only the scheduler assigns ToDos; claim them with POST /v1/agents/claim."})  # fmt: skip
        case protocol.Agree() | protocol.Refuse() | protocol.Inform() if not _todo_of(msg):
            return protocol.reply_to(msg, "agree", {"text": "noted"})
    return await agent.apply(session, msg)


def _todo_of(msg: protocol.Message) -> str | None:
    return getattr(msg.payload, "todo_id", None)


async def _submit(msg: protocol.Message, app: state_mod.State, session: store.Session, caller: Caller, text: str | None,
                  graph: protocol.GraphSpec | None, key: str | None, configured: bool,
                  time_zone: str = "UTC") -> protocol.Message:  # fmt: skip
    try:
        # Times in the text are read in the user's zone from the request's context.
        with tracing.span(
            "cpa.job.create", attributes={"cpa.tenant_id": str(caller.tenant_id)}
        ) as span:
            job = await intake.submit(session, tenant_id=caller.tenant_id, text=text, spec=graph,
                                      idempotency_key=key, planner_configured=configured,
                                      time_zone=time_zone)  # fmt: skip
            await intake.keep_trace(session, job, span)
        await app.limiter.hit(str(caller.tenant_id), session)
    except (errors.InvalidError, errors.PlannerError, errors.RateLimitedError) as exc:
        return protocol.reply_to(msg, "refuse", {"code": exc.code, "reason": exc.message})
    return protocol.reply_to(msg, "agree", {"job_id": str(job["id"]), "text": f"intent {job['intent']}"},
                             conversation_id=str(job["id"]))  # fmt: skip


async def _confirm(
    msg: protocol.Message, session: Any, p: protocol.ConfirmPayload
) -> protocol.Message:
    if p.todo_id:
        ids = [p.todo_id]
    else:
        assert p.job_id is not None
        ids = [str(t["id"]) for t in await session.job_todos(p.job_id) if t["status"] in ("confirming", "waiting")
               and t["requires_confirmation"] and t["confirmed_at"] is None]  # fmt: skip
    for todo_id in ids:
        await session.todo_confirm(todo_id, approved=p.approved)
    verb = "approved" if p.approved else "declined"
    return protocol.reply_to(msg, "inform", {"job_id": p.job_id, "todo_id": p.todo_id,
                                             "text": f"{len(ids)} ToDo(s) {verb}"})  # fmt: skip
