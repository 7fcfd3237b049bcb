"""The HTTP API: FastAPI routes composing the core; ``functions/api`` wraps it for Lambda."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from cpa_scheduler import tracing
from cpa_scheduler.api import jobs, messages, observe, problems, schedules
from cpa_scheduler.api.deps import AppState

app = FastAPI(
    title="CPA Scheduler",
    version="1.0.0",
    description="Jobs as ToDo graphs for CPA Desktop AI. Authenticate with a Supabase access token.",
)
problems.install(app)
app.include_router(jobs.router)
app.include_router(messages.router)
app.include_router(schedules.router)
app.include_router(observe.router)
app.add_middleware(observe.RequestMetrics)
# Only an OTEL_* endpoint imports OpenTelemetry; without one the cold import stays as it was.
if tracing.setup("cpa-scheduler-api"):
    tracing.instrument_app(app)


@app.get("/healthz", tags=["health"])
async def healthz() -> dict[str, Any]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@app.get(
    "/readyz",
    tags=["health"],
    responses={503: {"description": "The database is unreachable or the dispatcher is failing."}},
)
async def readyz(state: AppState) -> Any:
    """Readiness: the database is reachable and, where this process runs one, the dispatcher
    has made a successful pass recently."""
    body: dict[str, Any] = {"status": "ready", "database": "ready"}
    ready = await state.store.ping()
    if not ready:
        body["database"] = "unavailable"
        body["detail"] = "The database is unreachable."
    if state.dispatcher is not None:
        body["dispatcher"] = state.dispatcher.snapshot()
        if not state.dispatcher.ready:
            ready = False
            body.setdefault(
                "detail", f"The dispatcher is {body['dispatcher']['status']}: "
                f"{state.dispatcher.last_error or 'no successful pass yet'}."
            )  # fmt: skip
    if ready:
        return body
    body["status"] = "unavailable"
    return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})
