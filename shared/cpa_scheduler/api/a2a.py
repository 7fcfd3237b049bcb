"""The A2A edge's routes: the Agent Card and the JSON-RPC endpoint it names.

``GET /.well-known/agent-card.json`` is public, as the A2A specification expects. ``POST /a2a``
authenticates like every REST route (the bearer token, in a FastAPI dependency) and then hands
the request to the ``a2a-sdk``'s JSON-RPC dispatcher over :mod:`.a2a_handler`. The SDK is
imported on the first A2A request, not with the app.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from cpa_scheduler.api import deps, jobs, problems
from cpa_scheduler.api.deps import AppState, TenantHeader, VerifiedClaims

ENDPOINT = "/a2a"
CARD_PATH = "/.well-known/agent-card.json"

router = APIRouter(tags=["a2a"])
_kicks: set[asyncio.Task[None]] = set()  # running dispatcher kicks (a task needs a reference)


@functools.lru_cache(maxsize=8)
def _card(endpoint: str) -> dict[str, Any]:
    from cpa_scheduler import card

    return card.card_json(card.agent_card(endpoint))


@router.get(CARD_PATH, summary="The A2A Agent Card")
async def agent_card(request: Request) -> JSONResponse:
    """What this agent offers and how to call it (A2A 1.0, JSON-RPC binding)."""
    endpoint = str(request.base_url).rstrip("/") + ENDPOINT
    return JSONResponse(_card(endpoint), headers={"Cache-Control": "public, max-age=300"})


@router.post(
    ENDPOINT,
    summary="A2A JSON-RPC 2.0 endpoint",
    responses={k: v for k, v in problems.RESPONSES.items() if k in (401, 413, 422, 429, 503)},
    response_class=Response,
)
async def a2a_endpoint(
    request: Request,
    app: AppState,
    claims: VerifiedClaims,
    x_cpa_tenant: TenantHeader = None,
) -> Response:
    """SendMessage, SendStreamingMessage, GetTask, ListTasks, CancelTask and SubscribeToTask (A2A 1.0;
    send the header ``A2A-Version: 1.0``). Errors are JSON-RPC errors with the specification's
    codes; a missing token, an oversized body and the rate limit are HTTP answers, as on the
    REST routes."""
    from cpa_scheduler.api import a2a_handler

    deps.wanted_tenant(claims, x_cpa_tenant)  # a malformed tenant id is the REST routes' 422
    await request.body()  # read under the body limit before the SDK parses it

    def kick() -> None:
        # Now, not after the answer: a stream's answer ends only with the job.
        if app.config.dispatch_url:
            task = asyncio.create_task(
                jobs._kick(app.config.dispatch_url, app.config.dispatch_secret)
            )
            _kicks.add(task)
            task.add_done_callback(_kicks.discard)

    bound = jobs._buffered_bound(request, app.config.events_bound)
    request.state.a2a_call = a2a_handler.Call(app, claims, x_cpa_tenant, bound, kick)
    try:
        return await a2a_handler.dispatcher().handle_requests(request)
    except a2a_handler.Refused as refused:
        raise refused.error from None
