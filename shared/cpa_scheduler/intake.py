"""Turn a client's request (text or explicit graph) into a job."""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from cpa_scheduler import errors, graph, intents, protocol, schedules, store, times, tracing

# An agent seen this recently counts as online for optional desktop ToDos: an idle agent
# checks in once a minute (Realtime) or every 20 s (long-poll), and the database records it
# when the last record is older than 45 s (GET /v1/agents uses the same 90 s).
ONLINE = 90.0


def resolver(tz: ZoneInfo, now: datetime) -> intents.TimeResolver:
    """Reads a request's time expressions in the caller's zone at one fixed "now"."""
    return lambda when: times.resolve(when, tz=tz, now=now).isoformat()


async def _unoffered(
    session: store.Session, tenant_id: uuid.UUID | str, g: graph.Graph, keys: frozenset[str]
) -> set[str]:
    drop = set()
    for t in g:
        if t.key in keys and not await session.agent_offering(tenant_id, t.action, ONLINE):
            drop.add(t.key)
    return drop


def check_run_at(
    run_at: datetime | None, now: datetime, spec: protocol.GraphSpec | None = None
) -> None:
    """A 422 for a job's ``run_at``, or a ToDo's own, in the past: the same rule for both."""
    timed = [(["body", "run_at"], "run_at", run_at)]
    if spec is not None:
        timed += [
            (["body", "graph", "todos", str(i), "run_at"], f"ToDo {t.key!r}'s run_at", t.run_at)
            for i, t in enumerate(spec.todos)
        ]
    for loc, what, when in timed:
        if when is not None and when < now - timedelta(seconds=1):
            raise errors.InvalidError(
                f"{what} {when.isoformat()} is in the past; give a future time (RFC 3339 with "
                "an offset) or leave it out to start at once.",
                errors=[{"loc": loc, "msg": "time in the past"}],
            )


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
    time_zone: str = "UTC",
    run_at: datetime | None = None,
    now: datetime | None = None,
    schedule_cap: int = store.SCHEDULE_CAP,
) -> store.JobRow:
    """Validate and create the job in one transaction; a repeated key returns the same job.

    Times in the text are read in ``time_zone``. A text that starts with a recurrence ("Jeden
    Montag um 8 Uhr ...", "every day at 7am ...") creates a schedule for the rest of it; the
    job answers with a notification that names the schedule."""
    if idempotency_key is not None:
        # A key replays its first job only for the same body; another body is a conflict.
        body = {
            "request": text,
            "graph": None if spec is None else spec.model_dump(mode="json"),
            "priority": priority,
            "plan": force_planner,
            "time_zone": time_zone,
            "run_at": None if run_at is None else run_at.isoformat(),
        }
        await session.idempotency_check(tenant_id, idempotency_key, body_hash(body))

    tz = times.zone(time_zone)
    now = now or datetime.now(UTC)
    check_run_at(run_at, now, spec)
    recurring = times.recurring(text) if text and spec is None and not force_planner else None
    if recurring is not None:
        if idempotency_key:
            # A repeated key must not add the schedule twice: answer the first job.
            earlier = await session.job_by_idempotency_key(tenant_id, idempotency_key)
            if earlier is not None:
                return earlier
        cron, rest = recurring
        sched = await schedules.create(
            session, tenant_id=tenant_id, cron=cron, time_zone=tz.key, request=rest, spec=None,
            planner_configured=planner_configured, now=now, cap=schedule_cap,
        )  # fmt: skip
        note = schedules.announcement(sched)
        return await session.job_create(
            tenant_id=tenant_id, request=text, intent="schedule", idempotency_key=idempotency_key,
            priority=priority, time_zone=tz.key, run_at=run_at,
            todos=[{"key": "schedule", "action": "notify", "target": "cloud", "params": note,
                    "depends_on": []}],
        )  # fmt: skip
    intent, g, optional = intents.plan(
        text=text, spec=spec, planner_configured=planner_configured, force_planner=force_planner,
        resolve_time=resolver(tz, now),
    )  # fmt: skip
    rows = graph.todo_rows(g)
    if optional:
        g = intents.without(g, await _unoffered(session, tenant_id, g, optional))
        rows = [r | {"optional": True} if r["key"] in optional else r for r in graph.todo_rows(g)]
    return await session.job_create(
        tenant_id=tenant_id,
        todos=rows,
        request=text,
        intent=intent,
        idempotency_key=idempotency_key,
        priority=priority,
        run_at=run_at,
        time_zone=tz.key,
    )


def one_call(
    *,
    tenant_id: uuid.UUID | None,
    text: str | None = None,
    spec: protocol.GraphSpec | None = None,
    idempotency_key: str | None = None,
    priority: int = 0,
    planner_configured: bool = False,
    force_planner: bool = False,
    time_zone: str = "UTC",
    run_at: datetime | None = None,
    traceparent: str | None = None,
    rate_limit: tuple[int, int] | None = None,
    now: datetime | None = None,
) -> store.Submission | None:
    """:func:`submit` for ``POST /v1/jobs`` as one SQL call (:meth:`store.Session.submit` or,
    in a transaction of its own, :meth:`store.Store.submit`): tenant choice, create, trace
    context, Postgres rate limit and the answer (the job's JSON text) in
    ``cpa.job_submit_v3``. This is the validation and planning before it, without the database.

    ``tenant_id`` None: the caller's oldest membership. Returns None for the requests that
    need the tenant before the create (a recurring text makes a schedule; ToDos kept only
    where an agent offers them, and a request with an Idempotency-Key, whose body hash is
    checked against the tenant): the caller then takes :func:`submit`."""
    tz = times.zone(time_zone)
    now = now or datetime.now(UTC)
    check_run_at(run_at, now, spec)
    if text and spec is None and not force_planner and times.recurring(text) is not None:
        return None
    if idempotency_key is not None:
        # The body-hash check needs the tenant first: keyed requests take submit's path.
        return None
    intent, g, optional = intents.plan(
        text=text, spec=spec, planner_configured=planner_configured, force_planner=force_planner,
        resolve_time=resolver(tz, now),
    )  # fmt: skip
    if optional:
        return None
    return store.Submission(
        tenant_id=tenant_id, todos=graph.todo_rows(g), request=text, intent=intent,
        idempotency_key=idempotency_key, priority=priority, run_at=run_at, time_zone=tz.key,
        traceparent=traceparent, rate_limit=rate_limit,
    )  # fmt: skip


async def keep_trace(session: store.Session, job: store.JobRow, span: tracing.Span | None) -> None:
    """Store the creating span's context with the job, in the creating transaction, so the
    dispatcher and agents continue this trace. Nothing to do when tracing is off."""
    if span is None:
        return
    span.set_attribute("cpa.job_id", str(job.id))
    value = tracing.traceparent(span)
    if value is not None:
        await session.job_trace_set(job.id, value)


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
    "run_at",
    "schedule_id",
)
TODO_FIELDS = (
    "id", "key", "action", "target", "status", "depends_on", "params", "result", "error",
    "attempts", "started_at", "finished_at", "requires_confirmation", "run_at",
)  # fmt: skip


def job_view(job: store.JobRow, todos: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The public JSON shape of a job (``GET /v1/jobs/{id}``)."""
    out = {k: getattr(job, k) for k in JOB_FIELDS}
    out["id"] = str(job.id)
    # The desktop follows a job on the Realtime topic 'tenant:<tenant_id>:user:<created_by>'.
    out["tenant_id"] = str(job.tenant_id)
    out["created_by"] = str(job.created_by) if job.created_by else None
    out["schedule_id"] = str(job.schedule_id) if job.schedule_id else None
    if todos is not None:
        out["todos"] = [{k: t.get(k) for k in TODO_FIELDS} | {"id": str(t["id"])} for t in todos]
    return out
