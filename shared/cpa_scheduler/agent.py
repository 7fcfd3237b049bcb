"""Desktop assignment: desktop agents claim their tenant's desktop ToDos and report back.

The dispatcher never runs desktop ToDos. An agent claims them (``agent_claim_v1``: the
tenant's ToDos for the actions the agent offers, under a lease owned by ``agent:<id>``) and
receives ``assign`` messages. It answers ``agree``, ``refuse``, ``inform``, ``done`` or
``failure``; :func:`apply` turns each into the matching state change and answers with a reply.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from cpa_scheduler import errors, graph, protocol, store, tracing

SCHEDULER = "scheduler"
MAX_REFUSALS = 3


def owner(agent_id: str) -> str:
    """The lease owner string of a desktop agent."""
    return f"agent:{agent_id}"


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
            await session.todo_fail(
                [{"id": str(row["id"]), "owner": owner(agent_id), "error": exc.message}]
            )
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


async def apply(session: store.Session, message: protocol.Message) -> protocol.Message:
    """Apply an agent's reply to an assignment; answers ``agree``, ``inform`` or ``refuse``."""
    lease = owner(message.sender)
    match message:
        case protocol.Done(payload=p):
            item = {"id": p.todo_id, "owner": lease, "result": p.result}
            if await session.todo_complete([item]):
                return protocol.reply_to(message, "agree", {"todo_id": p.todo_id, "text": "done"})
            return await _stale(session, message, p.todo_id)
        case protocol.Failure(payload=p):
            item = {"id": p.todo_id, "owner": lease, "error": p.error, "retryable": p.retryable}
            if await session.todo_fail([item]):
                return protocol.reply_to(message, "agree", {"todo_id": p.todo_id, "text": "failed"})
            return await _stale(session, message, p.todo_id)
        case protocol.Refuse(payload=p) if p.todo_id:
            released = await session.todo_release(
                [{"id": p.todo_id, "owner": lease}], refusal=True, max_refusals=MAX_REFUSALS
            )
            if not released:
                return await _stale(session, message, p.todo_id)
            await session.todo_note(
                p.todo_id, "agent.refuse", {"agent": message.sender, "reason": p.reason}
            )
            return protocol.reply_to(
                message, "inform", {"todo_id": p.todo_id, "text": "released for another agent"}
            )
        case protocol.Agree(payload=p) if p.todo_id:
            await session.todo_note(p.todo_id, "agent.agree", {"agent": message.sender})
            return protocol.reply_to(message, "inform", {"todo_id": p.todo_id, "text": "recorded"})
        case protocol.Inform(payload=p) if p.todo_id:
            data = {"agent": message.sender, "text": p.text, **p.data}
            await session.todo_note(p.todo_id, "agent.inform", data)
            return protocol.reply_to(message, "agree", {"todo_id": p.todo_id, "text": "recorded"})
    raise errors.ProtocolError(
        f"A {message.type!r} message must name the ToDo it is about (payload.todo_id)."
    )


async def _stale(
    session: store.Session, message: protocol.Message, todo_id: str
) -> protocol.Message:
    todo = await session.todo_get(todo_id)
    if message.type == "done" and todo["status"] == "done":
        return protocol.reply_to(message, "agree", {"todo_id": todo_id, "text": "already done"})
    return protocol.reply_to(
        message,
        "refuse",
        {
            "todo_id": todo_id,
            "code": "lease_not_held",
            "reason": (
                f"The ToDo {todo['key']!r} is {todo['status']} and not leased to "
                f"{message.sender!r}; claim it again before reporting."
            ),
        },
    )
