"""The protocol endpoint and the agent claim: parse, authenticate, call the core, serialise."""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from cpa_scheduler import agent, protocol, tracing, wakeups
from cpa_scheduler.api import problems
from cpa_scheduler.api.deps import (
    AppState,
    CurrentCaller,
    TenantHeader,
    UserSession,
    VerifiedClaims,
    get_caller,
)
from cpa_scheduler.api.jobs import _buffered_bound

router = APIRouter(tags=["agents"], responses=problems.RESPONSES)


class AgentOut(BaseModel):
    agent_id: str
    name: str | None = None
    actions: list[str]
    last_seen_at: datetime
    online: bool = Field(description="Seen in the last 90 s.")
    created_by: str | None = Field(default=None, description="The user the agent id belongs to.")


class AgentList(BaseModel):
    tenant_id: str = Field(description="The caller's tenant (its agents topic names it).")
    user_id: str = Field(description="The caller: tenant:<tenant_id>:agents:<user_id> wakes them.")
    agents: list[AgentOut]


MAX_WAIT = 20.0  # seconds a claim may long-poll
ONLINE_SECONDS = 90.0  # an agent seen this recently is online


class ClaimBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    agent_id: str = Field(min_length=1, max_length=200)
    actions: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(
        default=None, max_length=100
    )
    limit: int = Field(default=10, ge=1, le=50)
    wait: float = Field(
        default=0, ge=0, le=MAX_WAIT,
        description="Long-poll: seconds to wait for work (answers as soon as there is some).",
    )  # fmt: skip


@router.post("/v1/agents/claim")
async def claim(
    body: ClaimBody,
    request: Request,
    app: AppState,
    claims: VerifiedClaims,
    x_cpa_tenant: TenantHeader = None,
) -> list[dict[str, Any]]:
    """Claim desktop ToDos of the caller's jobs for an agent; answers ``assign`` messages.

    With ``wait`` it long-polls: each attempt is a short transaction of its own (no connection
    is held while waiting), woken by the database's ``cpa_desktop_ready`` notification on a
    long-running host, or every 0.2 s behind a buffered host (Lambda), whose remaining time
    bounds the wait as it does the events route's."""
    wait = min(body.wait, _buffered_bound(request, app.config.events_bound) or body.wait)
    deadline = time.monotonic() + wait
    listener = None
    if wait > 0 and "aws.event" not in request.scope:
        listener = app.wakeups
        await listener.ready(within=min(1.0, wait))
    # Keyed by user alone: the tenant is known only inside the first attempt, and the waiter
    # must be registered before it (a user of two tenants is merely woken once too often).
    wake_key = str(claims.sub)
    started = time.monotonic()
    while True:
        with contextlib.ExitStack() as stack:
            woken = stack.enter_context(listener.waiter(wake_key)) if listener else None
            async with app.store.user(claims.for_database()) as session:
                caller = await get_caller(claims, session, x_cpa_tenant)
                assigns = await agent.claim(
                    session, tenant_id=caller.tenant_id, agent_id=body.agent_id,
                    actions=body.actions, limit=body.limit,
                )  # fmt: skip
            left = deadline - time.monotonic()
            if assigns or left <= 0:
                return [protocol.dump(a) for a in assigns]
            if listener is not None and listener.stopping:
                return []
            if woken is not None and listener is not None and listener.listening:
                try:
                    await asyncio.wait_for(woken.wait(), left)
                except TimeoutError:
                    return []  # nothing became ready for this user: no last claim needed
                if listener.stopping:
                    return []  # the server is shutting down
            else:
                # No LISTEN connection (Lambda): claim again every 0.2 s for the first 2 s (an
                # agent answering a burst of work), then every second. An empty claim writes
                # nothing and costs less than a probe under row-level security would
                # (tests/bench/RESULTS.md, issue 21).
                fast = time.monotonic() - started < wakeups.POLL_FAST_FOR
                pause = wakeups.POLL_SECONDS if fast else wakeups.POLL_SLOW_SECONDS
                await asyncio.sleep(min(pause, left))
        if await request.is_disconnected():
            return []


@router.get("/v1/agents", response_model=AgentList)
async def list_agents(caller: CurrentCaller, session: UserSession) -> dict[str, Any]:
    """The caller's desktop agents (a tenant's owners and admins: all of the tenant's)."""
    rows = await session.agent_list(caller.tenant_id, ONLINE_SECONDS)
    return {
        "tenant_id": str(caller.tenant_id),
        "user_id": str(caller.claims.sub),
        "agents": [_agent_view(r) for r in rows],
    }


def _agent_view(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "agent_id": row["agent_id"], "name": row["name"], "actions": list(row["actions"]),
        "last_seen_at": row["last_seen_at"], "online": bool(row["online"]),
        "created_by": str(row["created_by"]) if row["created_by"] else None,
    }  # fmt: skip


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
