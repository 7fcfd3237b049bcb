"""Schedule routes: recurring jobs from a cron expression in a time zone."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cpa_scheduler import protocol, schedules
from cpa_scheduler.api import problems
from cpa_scheduler.api.deps import AppState, CurrentCaller, UserSession

router = APIRouter(prefix="/v1/schedules", tags=["schedules"], responses=problems.RESPONSES)


class ScheduleCreate(BaseModel):
    """A cron expression, its zone, and either a request text or an explicit graph."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cron: str = Field(
        min_length=1,
        max_length=200,
        description="5 standard fields: minute hour day month weekday (ASCII digits, '*', ',', "
        "'-', '/'; month and weekday may be 3-letter names). No macros (@daily), L, W or #.",
    )
    time_zone: str = Field(
        default="UTC", min_length=1, max_length=64, description="IANA zone the cron is read in."
    )
    request: str | None = Field(default=None, min_length=1, max_length=4000)
    graph: protocol.GraphSpec | None = None

    @model_validator(mode="after")
    def _one(self) -> ScheduleCreate:
        if (self.request is None) == (self.graph is None):
            raise ValueError("give exactly one of 'request' or 'graph'")
        return self


class ScheduleOut(BaseModel):
    id: str
    cron: str
    time_zone: str
    paused: bool
    next_run_at: datetime
    created_at: datetime
    request: str | None = None
    graph: dict[str, Any] | None = None
    intent: str | None = None
    last_run_at: datetime | None = None
    last_job_id: str | None = None
    skipped_runs: int = Field(
        default=0, description="Occurrences skipped: the tenant's scheduled jobs per minute "
        "(CPA_SCHEDULE_JOBS_PER_MINUTE) were spent; each still has its job, cancelled.",
    )  # fmt: skip
    last_skipped_at: datetime | None = None


class ScheduleList(BaseModel):
    schedules: list[ScheduleOut]


@router.post("", status_code=201, response_model=ScheduleOut)
async def create_schedule(
    body: ScheduleCreate, app: AppState, caller: CurrentCaller, session: UserSession
) -> dict[str, Any]:
    configured = app.config.planner_configured
    # A schedule makes jobs: its creation counts against the tenant's rate limit of jobs.
    await app.limiter.hit(str(caller.tenant_id), session)
    row = await schedules.create(
        session, tenant_id=caller.tenant_id, cron=body.cron, time_zone=body.time_zone,
        request=body.request, spec=body.graph, planner_configured=configured,
        cap=app.config.schedule_cap,
    )  # fmt: skip
    return schedules.view(row)


@router.get("", response_model=ScheduleList)
async def list_schedules(caller: CurrentCaller, session: UserSession) -> dict[str, Any]:
    rows = await session.schedule_list(caller.tenant_id)
    return {"schedules": [schedules.view(r) for r in rows]}


@router.get("/{schedule_id}", response_model=ScheduleOut)
async def get_schedule(
    schedule_id: uuid.UUID, caller: CurrentCaller, session: UserSession
) -> dict[str, Any]:
    return schedules.view(await session.schedule_get(schedule_id))


@router.delete("/{schedule_id}", status_code=204, response_class=Response)
async def delete_schedule(
    schedule_id: uuid.UUID, caller: CurrentCaller, session: UserSession
) -> Response:
    await session.schedule_get(schedule_id)
    await session.schedule_delete(schedule_id)
    return Response(status_code=204)


@router.post("/{schedule_id}/pause", response_model=ScheduleOut)
async def pause_schedule(
    schedule_id: uuid.UUID, caller: CurrentCaller, session: UserSession
) -> dict[str, Any]:
    await session.schedule_get(schedule_id)
    return schedules.view(await session.schedule_pause(schedule_id, paused=True))


@router.post("/{schedule_id}/resume", response_model=ScheduleOut)
async def resume_schedule(
    schedule_id: uuid.UUID, app: AppState, caller: CurrentCaller, session: UserSession
) -> dict[str, Any]:
    row = await schedules.resume(session, schedule_id, cap=app.config.schedule_cap)
    return schedules.view(row)
