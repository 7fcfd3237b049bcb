"""Structured logs: one JSON line per event, with the trace and the entity it is about.

Fields: ``time, level, logger, message``, then ``trace_id, span_id, tenant_id, job_id,
todo_id`` where known, then whatever the call passed in ``extra``. The ids come from
:func:`bind` (a context variable, so concurrent ToDos do not mix) and from the current
OpenTelemetry span when tracing is on. ``CPA_LOG_LEVEL`` sets the level (default ``INFO``).
A terminal gets short human-readable lines instead (``CPA_LOG_FORMAT=json|text`` overrides);
both are read by :mod:`cpa_scheduler.settings`.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, TextIO

from cpa_scheduler import settings, tracing

CONTEXT_FIELDS = ("trace_id", "span_id", "tenant_id", "job_id", "todo_id")
_bound: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("cpa_log_ctx", default={})  # noqa: B039
# The attributes every LogRecord has; anything else came from ``extra``.
# uvicorn adds ``color_message`` (the message with terminal colours): not worth a field.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message", "asctime", "color_message"}  # fmt: skip


@contextlib.contextmanager
def bind(**fields: object) -> Iterator[None]:
    """Attach ids (tenant_id, job_id, todo_id, ...) to every log line inside the block."""
    token = _bound.set(_bound.get() | {k: str(v) for k, v in fields.items() if v is not None})
    try:
        yield
    finally:
        _bound.reset(token)


def annotate(**fields: object) -> None:
    """Attach ids for the rest of the current task (an HTTP request's task: the API's caller)."""
    _bound.set(_bound.get() | {k: str(v) for k, v in fields.items() if v is not None})


def context() -> dict[str, str]:
    """The ids known here: the bound ones and the current span's."""
    out = dict(_bound.get())
    ids = tracing.current_ids()
    if ids is not None:
        out["trace_id"], out["span_id"] = ids
    return out


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(context())
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """For a person at a terminal: the message, then the ids that are known."""

    def format(self, record: logging.LogRecord) -> str:
        ids = context()
        extra = {k: v for k, v in record.__dict__.items() if k not in _STANDARD}
        tail = " ".join(f"{k}={v}" for k, v in {**ids, **extra}.items() if k != "span_id")
        text = f"{record.levelname.lower():7} {record.name}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return f"{text}  {tail}" if tail else text


def setup(
    config: settings.Settings, stream: TextIO | None = None, *, json_lines: bool | None = None
) -> None:
    """Route every logger (ours, uvicorn's) through one handler on stderr, at the configured level.

    JSON unless the stream is a terminal; the configured format (CPA_LOG_FORMAT) forces either."""
    out = stream or sys.stderr
    if json_lines is None:
        forced = config.log_format
        json_lines = forced == "json" or (forced != "text" and not out.isatty())
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(config.log_level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
