"""Turn a client's request (text or explicit graph) into a job."""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

from cpa_scheduler import catalogue, errors, graph, intents, protocol, store

NO_PLANNER = (
    "No intent matches this request and no planner is configured; "
    "set OPENAI_API_KEY or OPENAI_BASE_URL, or submit an explicit graph."
)


def todo_rows(g: graph.Graph) -> list[dict[str, Any]]:
    """The ToDos of a validated graph in the shape ``job_create_v1`` takes."""
    return [
        {
            "key": t.key,
            "action": t.action,
            "target": t.target,
            "params": t.params,
            "depends_on": list(dict.fromkeys(t.depends_on)),
            "max_attempts": t.max_attempts,
            "requires_confirmation": t.requires_confirmation,
        }
        for t in g
    ]


def plan(
    *,
    text: str | None,
    spec: protocol.GraphSpec | None,
    planner_configured: bool,
    force_planner: bool = False,
) -> tuple[str, graph.Graph]:
    """The intent and validated graph for a request text or an explicit graph.

    ``force_planner`` skips the intent router: the client asked for LLM planning."""
    cat = catalogue.default()
    if spec is not None:
        return "explicit", cat.build(spec)
    if text is None or not text.strip():
        raise errors.InvalidError("The request text is empty; say what should be done.")
    routed = intents.default().route(text)
    if routed.graph is not None and not force_planner:
        return routed.intent, cat.build(routed.graph)
    if not planner_configured:
        raise errors.PlannerError(NO_PLANNER)
    planning = protocol.GraphSpec(
        todos=[protocol.TodoSpec(key="plan", action="plan", params={"request": routed.text})]
    )
    return ("planned" if force_planner else routed.intent), cat.build(planning)


async def submit(
    session: store.Session,
    *,
    tenant_id: uuid.UUID | str,
    text: str | None = None,
    spec: protocol.GraphSpec | None = None,
    idempotency_key: str | None = None,
    priority: int = 0,
    planner_configured: bool = False,
    force_planner: bool = False,
) -> dict[str, Any]:
    """Validate and create the job in one transaction; a repeated key returns the same job."""
    intent, g = plan(
        text=text, spec=spec, planner_configured=planner_configured, force_planner=force_planner
    )
    if idempotency_key is not None:
        body = {
            "request": text,
            "graph": None if spec is None else spec.model_dump(mode="json"),
            "priority": priority,
            "plan": force_planner,
        }
        await session.idempotency_check(tenant_id, idempotency_key, body_hash(body))
    return await session.job_create(
        tenant_id=tenant_id,
        todos=todo_rows(g),
        request=text,
        intent=intent,
        idempotency_key=idempotency_key,
        priority=priority,
    )


def body_hash(body: Any) -> str:
    """A stable fingerprint of a job request's body (key order and spacing do not matter)."""
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "backslashreplace")).hexdigest()


JOB_FIELDS = (
    "id",
    "status",
    "request",
    "intent",
    "error",
    "created_at",
    "started_at",
    "completed_at",
)
TODO_FIELDS = (
    "id", "key", "action", "target", "status", "depends_on", "params", "result", "error",
    "attempts", "started_at", "finished_at", "requires_confirmation",
)  # fmt: skip


def job_view(job: dict[str, Any], todos: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The public JSON shape of a job (``GET /v1/jobs/{id}``)."""
    out = {k: job.get(k) for k in JOB_FIELDS}
    out["id"] = str(job["id"])
    if todos is not None:
        out["todos"] = [{k: t.get(k) for k in TODO_FIELDS} | {"id": str(t["id"])} for t in todos]
    return out
