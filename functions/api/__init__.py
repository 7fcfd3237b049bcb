"""Lambda entry of the HTTP API: the package's FastAPI app behind Mangum."""

from __future__ import annotations

import logging
from typing import Any

from cpa_scheduler import errors, logs, settings, tracing
from cpa_scheduler.api import app
from mangum import Mangum

_mangum: Mangum | None = None


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    global _mangum
    if _mangum is None:
        # On the first event rather than at import: Mangum takes the thread's event loop when
        # it is built (making one if there is none), which Lambda then keeps for every warm
        # invocation; an importer (tests, tools) gets no loop it did not ask for.
        try:
            logs.setup(settings.from_env())
        except errors.ConfigError as exc:
            # Still answer over HTTP: every request that needs the settings gets this named
            # error as problem+json, where a raising handler would give API Gateway's bare 502.
            logging.getLogger(__name__).error("%s", exc)
        _mangum = Mangum(app, lifespan="off")
    try:
        answer: dict[str, Any] = _mangum(event, context)
        return answer
    finally:
        tracing.flush()  # before the runtime freezes the process


__all__ = ["app", "handler"]
