"""Recurring schedules: create them, and materialise each due occurrence into one job.

A schedule's request (or graph) is planned once, when it is created, so a bad request is a 422
then and not a failed job every Monday. The dispatcher calls :func:`fire_due` at the start of
every pass. Each due schedule row is claimed ``FOR UPDATE SKIP LOCKED`` and the occurrence's job
is unique per (schedule, occurrence), so concurrent passes create exactly one job.

Catch-up: a schedule whose occurrences were missed (the dispatcher was down) runs once, for the
latest missed occurrence, and then continues with the next future one. It does not run once per
missed slot.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime
from typing import Any

from cpa_scheduler import errors, graph, intents, protocol, store, times

log = logging.getLogger(__name__)

FIELDS = ("id", "cron", "time_zone", "paused", "next_run_at", "created_at", "request", "graph",
          "intent", "last_run_at", "last_job_id", "skipped_runs", "last_skipped_at")  # fmt: skip


def view(row: dict[str, Any]) -> dict[str, Any]:
    """The public JSON shape of a schedule."""
    out = {k: row.get(k) for k in FIELDS}
    out["id"] = str(row["id"])
    out["last_job_id"] = str(row["last_job_id"]) if row.get("last_job_id") else None
    return out


def announcement(row: dict[str, Any]) -> dict[str, Any]:
    """The notification a request that created a schedule answers with."""
    what = row["request"] or "the graph"
    when = row["next_run_at"].astimezone(times.zone(row["time_zone"]))
    return {
        "title": "Schedule",
        "message": (
            f"Scheduled {what!r} at cron '{row['cron']}' ({row['time_zone']}); the next run is "
            f"{when.isoformat(timespec='minutes')}. Schedule id: {row['id']}."
        ),
        "level": "success",
    }


def plan(
    *, request: str | None, spec: protocol.GraphSpec | None, planner_configured: bool
) -> tuple[str, list[dict[str, Any]]]:
    """The intent and ToDo rows every occurrence's job is created with."""
    if request is not None and spec is None:
        routed_when = _named_time(request)
        if routed_when:
            raise errors.InvalidError(
                f"A scheduled request cannot name its own time ({routed_when!r}); the "
                "schedule's cron says when it runs. Leave the time out of the request.",
                errors=[{"loc": ["body", "request"], "msg": "time inside a scheduled request"}],
            )
    timed = [t.key for t in spec.todos if t.run_at is not None] if spec is not None else []
    if timed:
        raise errors.InvalidError(
            f"A scheduled graph cannot give ToDos a run_at ({', '.join(timed)}); each run "
            "starts at its occurrence. Drop run_at from the graph.",
            errors=[{"loc": ["body", "graph", "todos", k, "run_at"], "msg": "run_at in a schedule"}
                    for k in timed],
        )  # fmt: skip
    intent, g, optional = intents.plan(
        text=request, spec=spec, planner_configured=planner_configured
    )
    # Optional desktop ToDos depend on which agents are online when a run happens: leave them out.
    if optional:
        g = intents.without(g, set(optional))
    return intent, graph.todo_rows(g)


def _named_time(request: str) -> str:
    routed = intents.default().route(request, resolve_time=lambda when: "")
    return routed.groups.get("when", "")


async def create(
    session: store.Session,
    *,
    tenant_id: uuid.UUID | str,
    cron: str,
    time_zone: str,
    request: str | None,
    spec: protocol.GraphSpec | None,
    planner_configured: bool,
    now: datetime | None = None,
    cap: int = store.SCHEDULE_CAP,
) -> dict[str, Any]:
    """Validate and create a schedule; its first run is the next occurrence after ``now``.

    A tenant with ``cap`` active schedules gets a :class:`errors.ConflictError` instead."""
    tz = times.zone(time_zone)
    clean = times.validate_cron(cron)
    intent, todos = plan(request=request, spec=spec, planner_configured=planner_configured)
    first = times.cron_next(clean, tz, now or datetime.now(UTC))
    graph = None if spec is None else spec.model_dump(mode="json", exclude_none=True)
    return await session.schedule_create(
        tenant_id=tenant_id, cron=clean, time_zone=tz.key, request=request, graph=graph,
        intent=intent, todos=todos, next_run_at=first, cap=cap,
    )  # fmt: skip


async def resume(
    session: store.Session,
    schedule_id: uuid.UUID | str,
    *,
    cap: int = store.SCHEDULE_CAP,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Resume from the next occurrence after now: what fell into the pause is skipped."""
    row = await session.schedule_get(schedule_id)
    nxt = times.cron_next(row["cron"], times.zone(row["time_zone"]), now or datetime.now(UTC))
    return await session.schedule_pause(schedule_id, paused=False, next_run_at=nxt, cap=cap)


async def fire_due(
    db: store.Store,
    *,
    now: datetime | None = None,
    limit: int = 50,
    budget: int = store.SCHEDULE_JOBS_PER_MINUTE,
) -> int:
    """Materialise every due occurrence; returns how many schedules fired (skipped ones too).

    ``budget``: jobs one tenant's schedules may start in one minute; an occurrence past it is
    skipped, its job created cancelled without ToDos (see migration 20261207003000)."""
    now = now or datetime.now(UTC)
    fired = 0
    async with db.service() as session:
        for row in await session.schedule_due(now, limit):
            try:
                async with session.conn.transaction():  # a savepoint: one bad row fails alone
                    tz = times.zone(row["time_zone"])
                    due: datetime = row["next_run_at"]
                    occurrence = times.cron_latest(row["cron"], tz, due, now) or due
                    job = await session.schedule_fire(
                        row["id"], occurrence, times.cron_next(row["cron"], tz, now), budget
                    )
                fired += 1
                if job.status == "cancelled" and job.todo_count == 0:
                    log.info("schedule %s skipped %s: %s", row["id"], occurrence, job.error)
            except errors.CpaError as exc:
                log.warning("schedule %s could not fire: %s", row["id"], exc.message)
    return fired
