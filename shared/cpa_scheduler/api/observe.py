"""``GET /metrics`` and the request metrics middleware."""

from __future__ import annotations

import hmac
import time
from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cpa_scheduler import errors, metrics, service
from cpa_scheduler.api.deps import AppState

router = APIRouter(tags=["health"])


class RequestMetrics:
    """Counts every request by its route template (not its path: ids would explode the series)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            metrics.instruments().http_requests.labels(method, template, str(status)).inc()
            metrics.instruments().http_duration.labels(method, template).observe(
                time.perf_counter() - began
            )


# Not in the OpenAPI document: it is for scrapers, not for the API's clients.
@router.get("/metrics", response_class=Response, include_in_schema=False)
async def metrics_endpoint(request: Request, state: AppState) -> Any:
    """Prometheus text format: this process's counters and the queue gauges from the database.

    With ``CPA_METRICS_TOKEN`` set, scrapers must send ``Authorization: Bearer <token>``."""
    token = state.config.metrics_token
    if token:
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given, token):
            raise errors.AuthError(
                "/metrics needs 'Authorization: Bearer <CPA_METRICS_TOKEN>' (set in the scraper)."
            )
    snapshot = tenants = None
    try:
        async with state.store.service() as session:
            snapshot = await session.metrics_snapshot()
            top = state.config.metrics_top_tenants
            if top:
                tenants = await session.metrics_top_tenants(top)
        metrics.instruments().database_up.set(1)
    except errors.UnavailableError:
        metrics.instruments().database_up.set(0)
    return Response(metrics.render(snapshot, tenants), media_type=metrics.CONTENT_TYPE)


def worker_app(services: service.Services) -> Any:
    """The long-running dispatcher's own small HTTP app: ``/metrics`` and ``/healthz``."""
    from fastapi import FastAPI

    app = FastAPI(title="CPA Scheduler dispatcher", openapi_url=None)
    app.state.services = services  # what /metrics reads (see deps.get_state)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    app.include_router(router)
    app.add_middleware(RequestMetrics)
    return app
