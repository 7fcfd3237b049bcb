"""RFC 9457 problem+json answers for every error, and the request-body size limit."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cpa_scheduler import errors

MAX_BODY = 256 * 1024
log = logging.getLogger("cpa.api")
_TITLES = {400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
           409: "Conflict", 413: "Content Too Large", 422: "Unprocessable Content",
           429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable"}  # fmt: skip


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
    401: _doc("Missing, expired or invalid access token."),
    404: _doc("No such entity, or it belongs to another tenant."),
    409: _doc("The state does not allow this change."),
    413: _doc("The body or the graph is too large."),
    422: _doc("The request is invalid; errors name the fields."),
    429: _doc("Too many jobs created; see Retry-After."),
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
    return problem(exc.status_code, code, str(exc.detail))


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


class BodyLimit:
    """Refuse bodies over MAX_BODY bytes with 413, by header or while streaming."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY:
            too_large = problem(
                413, "body_too_large", f"The request body is larger than {MAX_BODY} bytes."
            )
            await too_large(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > MAX_BODY:
                    raise errors.BodyTooLargeError(
                        f"The request body is larger than {MAX_BODY} bytes."
                    )
            return message

        await self.app(scope, limited, send)
