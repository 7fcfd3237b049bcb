"""Limits on JSON that reaches the database: nesting depth, size, and text Postgres can store.

Postgres ``jsonb`` refuses lone UTF-16 surrogates (``"\\ud800"``) and NUL characters, and a
value nested hundreds of levels deep breaks Python's JSON handling on the way back out. Params,
agent answers and executor results are checked here first, so each case becomes a clear 4xx or
a failed ToDo instead of a 500 or a rolled-back batch. The database checks params again on
insert (migration 20261127000510).
"""

from __future__ import annotations

import json
import math
from typing import Any

from cpa_scheduler import errors

MAX_DEPTH = 64
MAX_PARAMS_BYTES = 256 * 1024
MAX_RESULT_BYTES = 1024 * 1024
MAX_MESSAGE_BYTES = 2 * 1024 * 1024


def problem(value: Any, *, max_bytes: int, max_depth: int = MAX_DEPTH) -> str | None:
    """Why ``value`` cannot be stored as jsonb, or None when it can."""
    stack: list[tuple[Any, int, str]] = [(value, 1, "$")]
    while stack:
        node, depth, path = stack.pop()
        if isinstance(node, dict):
            if depth > max_depth:
                return f"it is nested deeper than {max_depth} levels (at {path})"
            for key, child in node.items():
                if isinstance(key, str) and (bad := _text_problem(key)):
                    return f"the key {path}.{_short(key)} {bad}"
                stack.append((child, depth + 1, f"{path}.{_short(str(key))}"))
        elif isinstance(node, list | tuple):
            if depth > max_depth:
                return f"it is nested deeper than {max_depth} levels (at {path})"
            stack.extend((child, depth + 1, f"{path}[{i}]") for i, child in enumerate(node))
        elif isinstance(node, str) and (bad := _text_problem(node)):
            return f"the text at {path} {bad}"
        elif isinstance(node, float) and not math.isfinite(node):
            return f"the number at {path} is not finite"
    try:
        size = len(json.dumps(value, separators=(",", ":"), default=str).encode("utf-8"))
    except (TypeError, ValueError) as exc:
        return f"it is not JSON ({exc})"
    if size > max_bytes:
        return f"it is {size} bytes of JSON, more than {max_bytes}"
    return None


def check(value: Any, what: str, *, max_bytes: int, max_depth: int = MAX_DEPTH) -> None:
    """Raise an :class:`errors.InvalidError` naming ``what`` when ``value`` cannot be stored."""
    if (bad := problem(value, max_bytes=max_bytes, max_depth=max_depth)) is not None:
        raise errors.InvalidError(f"{what} cannot be stored: {bad}. Send smaller, plainer JSON.")


def _text_problem(text: str) -> str | None:
    if "\x00" in text:
        return "contains a NUL character (\\u0000)"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"contains an unpaired surrogate ({text[exc.start]!r}) that is not valid Unicode"
    return None


def _short(text: str) -> str:
    return text if len(text) <= 40 else text[:37] + "..."
