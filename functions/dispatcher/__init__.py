"""Lambda entry of the scheduled dispatcher: one pass per invocation."""

from __future__ import annotations

from cpa_scheduler.invocation import handler

__all__ = ["handler"]
