"""Scheduled dispatcher: ``handler(event, context)`` runs one dispatch pass in the time left.

Accepts any event: an EventBridge Scheduler input, an EventBridge "Scheduled Event" envelope,
an HTTP kick (Function URL or API Gateway v2, authenticated with ``CPA_DISPATCH_SECRET``), or
``{}``. The settings, the services and the event loop live at module scope, so warm
invocations reuse them.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hmac
import json
import logging
import sys
from typing import Any, Literal, Protocol

from pydantic import BaseModel

from cpa_scheduler import dispatch, errors, logs, metrics, service, settings, tracing

log = logging.getLogger("cpa.dispatch")
SAFETY_MARGIN_S = 3.0


class LambdaContext(Protocol):
    def get_remaining_time_in_millis(self) -> int: ...


class Invocation(BaseModel):
    """The event, parsed at the edge."""

    source: Literal["http", "eventbridge", "scheduler"]
    authorization: str | None = None

    @classmethod
    def parse(cls, event: dict[str, Any]) -> Invocation:
        if "requestContext" in event and "http" in event.get("requestContext", {}):
            headers = {k.lower(): v for k, v in (event.get("headers") or {}).items()}
            return cls(source="http", authorization=headers.get("authorization"))
        if event.get("detail-type") == "Scheduled Event" or event.get("source") == "aws.events":
            return cls(source="eventbridge")
        return cls(source="scheduler")


def budget(context: LambdaContext | None, fallback: float) -> float:
    """Seconds this pass may run: the invocation's remaining time minus a margin; without a
    context, ``fallback`` (CPA_DISPATCH_BUDGET)."""
    if context is None:
        return fallback
    return max(0.0, context.get_remaining_time_in_millis() / 1000 - SAFETY_MARGIN_S)


_config: settings.Settings | None = None
_loop: asyncio.AbstractEventLoop | None = None
_dispatcher: dispatch.Dispatcher | None = None


def _get_config() -> settings.Settings:
    global _config
    if _config is None:
        _config = settings.from_env()
    return _config


def _get_dispatcher(
    config: settings.Settings,
) -> tuple[asyncio.AbstractEventLoop, dispatch.Dispatcher]:
    global _loop, _dispatcher
    if _loop is None or _dispatcher is None:
        logs.setup(config)
        tracing.setup("cpa-scheduler-dispatcher")
        _loop = asyncio.new_event_loop()
        _dispatcher = service.build_services(config).dispatcher()
        atexit.register(_shutdown)
    return _loop, _dispatcher


def _shutdown() -> None:
    """At exit: close the pool and end the loop's tasks on the loop, then close it. Left to the
    garbage collector, the pool's pending tasks print "Task was destroyed but it is pending!"
    and "Event loop is closed"."""
    global _loop, _dispatcher
    loop, dispatcher, _loop, _dispatcher = _loop, _dispatcher, None, None
    if loop is None or loop.is_closed():
        return
    try:
        if dispatcher is not None:
            with contextlib.suppress(Exception):
                loop.run_until_complete(asyncio.wait_for(dispatcher.store.close(), 5))
        pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()


def _authorized(invocation: Invocation, secret: str | None) -> bool:
    given = (invocation.authorization or "").removeprefix("Bearer ").strip()
    return bool(secret) and hmac.compare_digest(given, secret or "")


def handler(event: dict[str, Any], context: LambdaContext | None = None) -> dict[str, Any]:
    config = _get_config()
    invocation = Invocation.parse(event if isinstance(event, dict) else {})
    if invocation.source == "http" and not _authorized(invocation, config.dispatch_secret):
        body = {"type": "about:blank", "title": "Unauthorized", "status": 401,
                "code": "unauthenticated",
                "detail": "The dispatcher kick needs 'Authorization: Bearer <CPA_DISPATCH_SECRET>'."}  # fmt: skip
        return {"statusCode": 401, "headers": {"content-type": "application/problem+json"},
                "body": json.dumps(body)}  # fmt: skip
    loop, dispatcher = _get_dispatcher(config)
    try:
        pass_budget = budget(context, config.dispatch_budget)
        summary = loop.run_until_complete(dispatcher.run_pass(pass_budget)).as_dict()
        loop.run_until_complete(dispatcher.maybe_prune())  # at most hourly per warm container
    except errors.CpaError as exc:
        log.error("The dispatch pass failed: %s", exc.message, extra={"code": exc.code})
        raise
    finally:
        tracing.flush()  # a frozen Lambda would otherwise hold the spans until the next event
    if config.on_lambda:
        _emf(summary)
    summary["source"] = invocation.source
    if invocation.source == "http":
        return {"statusCode": 200, "headers": {"content-type": "application/json"},
                "body": json.dumps(summary)}  # fmt: skip
    return summary


def _emf(summary: dict[str, Any]) -> None:
    """The pass's counts as CloudWatch metrics: a process that lives for a few invocations
    cannot be scraped, so its counters go out as an Embedded Metric Format log line."""
    values = {
        "TodosClaimed": float(summary["claimed"]),
        "TodosDone": float(summary["done"]),
        "TodosFailed": float(summary["failed"]),
        "TodosRetried": float(summary["retried"]),
        "PassSeconds": float(summary["elapsed"]),
    }
    line = metrics.emf_line("CpaScheduler", values, {"Function": "dispatcher"})
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
