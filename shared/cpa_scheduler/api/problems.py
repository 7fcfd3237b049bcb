"""RFC 9457 problem+json answers for every error, and the limits at the edge: header size,
body size and JSON nesting, checked before any route (or JSON parser) sees the request."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cpa_scheduler import errors

MAX_BODY = 256 * 1024
# JSON deeper than this is refused before any parser recurses into it (a 100,000-deep body
# would raise RecursionError in json.loads). Params may nest 64 levels (bounds.MAX_DEPTH);
# the envelopes around them (message, payload, graph, todos, ToDo) add a few.
MAX_BODY_DEPTH = 96
# All request headers together (names and values). `serve` lets uvicorn's h11 parser buffer
# up to H11_MAX_HEAD bytes so that this limit, not h11's, answers (with problem+json).
MAX_HEADER_BYTES = 16 * 1024
H11_MAX_HEAD = 2 * 1024 * 1024
log = logging.getLogger("cpa.api")
_TITLES = {400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
           409: "Conflict", 413: "Content Too Large", 422: "Unprocessable Content",
           429: "Too Many Requests", 431: "Request Header Fields Too Large",
           500: "Internal Server Error", 503: "Service Unavailable"}  # fmt: skip


class Problem(BaseModel):
    """RFC 9457 problem details, with a stable ``code`` and field ``errors``."""

    type: str = "about:blank"
    title: str
    status: int
    code: str
    detail: str
    errors: list[dict[str, Any]] | None = None


def _doc(description: str) -> dict[str, Any]:
    return {"model": Problem, "description": description,
            "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}  # fmt: skip


RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _doc("The body cannot be parsed (not UTF-8 JSON)."),
    401: _doc("Missing, expired or invalid access token."),
    404: _doc("No such entity, or it belongs to another tenant."),
    409: _doc("The state does not allow this change."),
    413: _doc("The body or the graph is too large."),
    422: _doc("The request is invalid (errors name the fields), or its JSON nests too deep."),
    429: _doc("Too many jobs or schedules created; see Retry-After."),
    431: _doc("The request headers are too large (16 KiB in all)."),
    503: _doc("The database is unavailable; see Retry-After."),
}


def problem(status: int, code: str, detail: str, **extra: Any) -> JSONResponse:
    body = {"type": "about:blank", "title": _TITLES.get(status, "Error"), "status": status,
            "code": code, "detail": detail, **extra}  # fmt: skip
    headers = {}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="cpa-scheduler"'
    return JSONResponse(
        body, status_code=status, media_type="application/problem+json", headers=headers
    )


async def _domain(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, errors.CpaError):  # registered for this type alone
        return await _unexpected(request, exc)
    extra = {"errors": exc.errors} if exc.errors else {}
    response = problem(exc.status, exc.code, exc.message, **extra)
    if isinstance(exc, errors.RateLimitedError):
        response.headers["Retry-After"] = str(int(exc.retry_after))
    elif isinstance(exc, errors.UnavailableError):
        response.headers["Retry-After"] = "5"
    return response


async def _validation(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, RequestValidationError):  # registered for this type alone
        return await _unexpected(request, exc)
    errs = [{"loc": [str(p) for p in e.get("loc", ())], "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()]  # fmt: skip
    first = errs[0] if errs else {"loc": [], "msg": "invalid"}
    where = ".".join(p for p in first["loc"] if p != "body") or "body"
    return problem(422, "invalid", f"The request is invalid at {where}: {first['msg']}.",
                   errors=json.loads(json.dumps(errs, default=str)))  # fmt: skip


async def _http(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, HTTPException):  # registered for this type alone
        return await _unexpected(request, exc)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    detail = str(exc.detail)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        # Starlette names the methods of the first route on the path; Allow lists them all.
        allow = _allowed(request) or headers.get("Allow", "")
        headers["Allow"] = allow
        detail = f"{request.method} is not allowed on {request.url.path}; use {allow}."
    elif exc.status_code == 400:
        detail = "The body cannot be parsed; send UTF-8 JSON with Content-Type: application/json."
    response = problem(exc.status_code, code, detail)
    response.headers.update(headers)
    return response


_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def _allowed(request: Request) -> str:
    """Every method the OpenAPI document gives the request's path."""
    table: list[tuple[re.Pattern[str], set[str]]] | None = getattr(
        request.app.state, "allow_table", None
    )
    if table is None:
        paths = request.app.openapi().get("paths", {})
        table = [
            (re.compile(re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(path))),
             {m.upper() for m in item if m in _METHODS})
            for path, item in paths.items()
        ]  # fmt: skip
        request.app.state.allow_table = table
    path = request.url.path
    methods = set().union(*(ms for rx, ms in table if rx.fullmatch(path)))
    return ", ".join(sorted(methods))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Input that slipped past the checks is still the client's mistake, not ours.
    if isinstance(exc, UnicodeError):
        return problem(422, "invalid", "The request holds text that is not valid Unicode (an "
                       "unpaired surrogate or a NUL character); send well-formed UTF-8.")  # fmt: skip
    if isinstance(exc, RecursionError):
        return problem(422, "invalid", "The request is nested too deeply; JSON may nest at "
                       "most 64 levels.")  # fmt: skip
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem(500, "internal", "Something went wrong on our side; the error was logged.")


def install(app: FastAPI) -> None:
    app.add_exception_handler(errors.CpaError, _domain)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(HTTPException, _http)
    app.add_exception_handler(Exception, _unexpected)
    app.add_middleware(BodyLimit)


_JSON_SPECIAL = re.compile(rb'[\[\]{}"\\]')


def nesting_over(body: bytes, limit: int) -> bool:
    """Whether the JSON text ``body`` nests arrays and objects deeper than ``limit`` (brackets
    inside strings do not count). Linear, without recursion, and free for the usual body: one
    with no more brackets than ``limit`` cannot be deeper."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    depth, in_string, skip = 0, False, -1
    for match in _JSON_SPECIAL.finditer(body):
        at = match.start()
        if at < skip:  # the character after a backslash
            continue
        char = body[at]
        if in_string:
            if char == 0x5C:  # backslash
                skip = at + 2
            elif char == 0x22:  # quote
                in_string = False
        elif char == 0x22:
            in_string = True
        elif char in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return True
        elif char in (0x5D, 0x7D):
            depth -= 1
    return False


class BodyLimit:
    """The edge: refuse oversized headers (431), bodies over MAX_BODY bytes (413, by header or
    while reading) and JSON nested deeper than MAX_BODY_DEPTH (422), before any route runs.

    A body is read here in full (it is at most MAX_BODY bytes) and handed on unchanged."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers") or []
        size = sum(len(name) + len(value) for name, value in headers)
        if size > MAX_HEADER_BYTES:
            await problem(
                431, "headers_too_large", f"The request headers are {size} bytes, more than "
                f"{MAX_HEADER_BYTES}; send a shorter Authorization token or fewer headers.",
            )(scope, receive, send)  # fmt: skip
            return
        fields = dict(headers)
        length = fields.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY:
            await _too_large()(scope, receive, send)
            return
        if (length is None or length in (b"", b"0")) and b"transfer-encoding" not in fields:
            await self.app(scope, receive, send)  # no body: nothing to read ahead
            return
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > MAX_BODY:
                await _too_large()(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if nesting_over(body, MAX_BODY_DEPTH):
            await problem(
                422, "invalid", f"The request body nests JSON deeper than {MAX_BODY_DEPTH} "
                "levels; send flatter JSON (params may nest at most 64 levels).",
            )(scope, receive, send)  # fmt: skip
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect

        await self.app(scope, replay, send)


def _too_large() -> JSONResponse:
    return problem(413, "body_too_large", f"The request body is larger than {MAX_BODY} bytes.")
