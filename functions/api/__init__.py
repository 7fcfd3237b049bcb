"""Lambda entry of the HTTP API: the package's FastAPI app behind Mangum."""

from __future__ import annotations

from typing import Any

from cpa_scheduler import logs, settings, tracing
from cpa_scheduler.api import app
from mangum import Mangum

logs.setup(settings.from_env())
_mangum = Mangum(app, lifespan="off")


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    try:
        answer: dict[str, Any] = _mangum(event, context)
        return answer
    finally:
        tracing.flush()  # before the runtime freezes the process


__all__ = ["app", "handler"]
