"""The HTTP API: FastAPI routes composing the core; ``functions/api`` wraps it for Lambda.

:func:`create_app` builds the app over given services (the CLI's ``serve``, tests); ``app``
is the app whose services are built from the environment on the first request that needs them
(``uvicorn cpa_scheduler.api:app``, the Lambda function).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from cpa_scheduler import service, tracing
from cpa_scheduler.api import a2a, jobs, messages, observe, problems, schedules, ui
from cpa_scheduler.api.deps import AppState

if TYPE_CHECKING:  # the API function never runs a dispatcher; keep its cold import small
    from cpa_scheduler import dispatch


def create_app(
    services: service.Services | None = None, *, dispatcher: dispatch.Health | None = None
) -> FastAPI:
    """The API over ``services`` (None: built from the environment on first use).

    ``dispatcher``: the health of a dispatcher running in this process, which ``/readyz``
    reports (``serve``)."""
    app = FastAPI(
        title="CPA Scheduler",
        version="1.0.0",
        description="Jobs as ToDo graphs for CPA Desktop AI. "
        "Authenticate with a Supabase access token.",
    )
    # Mangum runs the ASGI lifespan on every invocation, so the services cannot live in a
    # lifespan: the dependencies read them from here (see deps.get_state).
    app.state.services = services
    app.state.dispatcher = dispatcher
    problems.install(app)
    app.include_router(jobs.router)
    app.include_router(messages.router)
    app.include_router(schedules.router)
    app.include_router(observe.router)
    app.include_router(a2a.router)
    app.include_router(ui.router)
    app.add_middleware(observe.RequestMetrics)
    # Only an OTEL_* endpoint imports OpenTelemetry; without one the cold import stays as it was.
    if tracing.setup("cpa-scheduler-api"):
        tracing.instrument_app(app)
    app.add_api_route("/healthz", healthz, methods=["GET"], tags=["health"])
    app.add_api_route(
        "/readyz",
        readyz,
        methods=["GET"],
        tags=["health"],
        responses={
            503: {"description": "The database is unreachable or the dispatcher is failing."}
        },
    )
    return app


async def healthz() -> dict[str, Any]:
    """Liveness: the process answers."""
    return {"status": "ok"}


async def readyz(request: Request, state: AppState) -> Any:
    """Readiness: the database is reachable and, where this process runs one, the dispatcher
    has made a successful pass recently."""
    body: dict[str, Any] = {"status": "ready", "database": "ready"}
    ready = await state.store.ping()
    if not ready:
        body["database"] = "unavailable"
        body["detail"] = "The database is unreachable."
    dispatcher: dispatch.Health | None = request.app.state.dispatcher
    if dispatcher is not None:
        body["dispatcher"] = dispatcher.snapshot()
        if not dispatcher.ready:
            ready = False
            body.setdefault(
                "detail", f"The dispatcher is {body['dispatcher']['status']}: "
                f"{dispatcher.last_error or 'no successful pass yet'}."
            )  # fmt: skip
    if ready:
        return body
    body["status"] = "unavailable"
    return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})


app = create_app()
