"""Lambda entry of the HTTP API: the package's FastAPI app behind Mangum."""

from __future__ import annotations

from cpa_scheduler.api import app
from mangum import Mangum

handler = Mangum(app, lifespan="off")

__all__ = ["app", "handler"]
