"""The published event contract (docs/events.schema.json) as a test oracle for every channel."""

from __future__ import annotations

import json
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

SCHEMA_PATH = Path(__file__).parents[1] / "docs" / "events.schema.json"


@cache
def _validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


def validate(event: Any) -> dict[str, Any]:
    """Raise unless ``event`` is one valid progress event; returns it."""
    _validator().validate(event)
    # jsonschema checks date-time only with an optional extra installed: check it here.
    when = datetime.fromisoformat(event["created_at"])
    assert when.tzinfo is not None, event["created_at"]
    return dict(event)


def parse_sse(body: str) -> tuple[list[dict[str, Any]], int | None]:
    """SSE text as (events validated against the schema, retry hint in ms)."""
    events: list[dict[str, Any]] = []
    retry = None
    for block in body.split("\n\n"):
        fields: dict[str, list[str]] = {}
        for line in block.split("\n"):
            name, _, value = line.partition(":")
            if name:
                fields.setdefault(name, []).append(value.removeprefix(" "))
        if "retry" in fields:
            retry = int(fields["retry"][0])
        if "data" in fields:
            event = validate(json.loads("\n".join(fields["data"])))
            assert fields["id"] == [str(event["id"])] and fields["event"] == [event["kind"]]
            events.append(event)
    return events, retry
