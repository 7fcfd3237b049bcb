"""The protocol endpoint and the agent claim: parse, authenticate, call the core, serialise."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from cpa_scheduler import agent, protocol, tracing
from cpa_scheduler.api import problems
from cpa_scheduler.api.deps import AppState, CurrentCaller, UserSession

router = APIRouter(tags=["agents"], responses=problems.RESPONSES)


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


async def get_context(app: AppState, caller: CurrentCaller, session: UserSession) -> agent.Context:
    """The verified sender of a message: their session and tenant."""
    return agent.Context(
        session=session,
        tenant_id=caller.tenant_id,
        planner_configured=app.config.planner_configured,
        limiter=app.limiter,
        schedule_cap=app.config.schedule_cap,
    )


Sender = Annotated[agent.Context, Depends(get_context)]


@router.post("/v1/messages")
async def message(
    raw: Annotated[dict[str, Any], Body(description="Any protocol message.")],
    request: Request,
    sender: Sender,
) -> dict[str, Any]:
    """Any protocol message in; a protocol message out (the meaning is :func:`agent.answer`)."""
    msg = protocol.parse(raw)
    # A traceparent header already parents this request's span; without one, the message's
    # own trace_id names the trace (an agent answering an assign echoes the job's).
    parent = None
    if "traceparent" not in request.headers:
        parent = tracing.parent_from_trace_id(msg.trace_id, msg.id)
    if parent is None:
        return protocol.dump(await agent.answer(msg, sender))
    with tracing.span(f"cpa.message {msg.type}", context=parent,
                      attributes={"cpa.message_id": msg.id}):  # fmt: skip
        return protocol.dump(await agent.answer(msg, sender))
