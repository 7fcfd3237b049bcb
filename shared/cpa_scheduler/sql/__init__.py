"""Named SQL queries, loaded once from ``queries.sql`` (procrastinate's habit)."""

from __future__ import annotations

import functools
import re
from importlib import resources
from typing import LiteralString

_HEADER = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def parse(text: str) -> dict[str, LiteralString]:
    """Split a file of ``-- name: x`` blocks into ``{name: sql}``."""
    parts = _HEADER.split(text)
    queries: dict[str, LiteralString] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        lines = [line for line in body.strip().splitlines() if not line.lstrip().startswith("--")]
        if name in queries:
            raise ValueError(f"The query {name!r} is defined twice in queries.sql.")
        queries[name] = "\n".join(lines).strip().rstrip(";")
    return queries


@functools.cache
def queries() -> dict[str, LiteralString]:
    return parse(resources.files("cpa_scheduler.sql").joinpath("queries.sql").read_text("utf-8"))


def get(name: str) -> LiteralString:
    """The SQL text of a named query."""
    return queries()[name]
