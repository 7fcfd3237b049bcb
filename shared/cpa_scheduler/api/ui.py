"""The jobs page (``/ui``): hand-written ES modules, CSS and one HTML shell, served as package data.

No npm dependency and no build step: the page is a few hundred lines of modules the browser
loads as they are, so the wheel carries exactly what runs, and nothing is fetched from another
origin (the desktop may be offline). Every answer under ``/ui`` carries a strict
Content-Security-Policy: scripts and styles only from this origin, no inline code, and
connections only to this origin and the configured Supabase project (Realtime, Auth).
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Response
from fastapi.responses import RedirectResponse

from cpa_scheduler import errors, settings
from cpa_scheduler.api.deps import AppState, CurrentCaller, UserSession

router = APIRouter(prefix="/ui", include_in_schema=False)

_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".html": "text/html; charset=utf-8",
}


@functools.cache
def _files() -> dict[str, bytes]:
    """Every file of the page, read once: a request can only pick one of these names, so
    nothing outside ``ui/`` is reachable."""
    folder = resources.files("cpa_scheduler").joinpath("ui")
    if not folder.is_dir():
        return {}
    return {
        f.name: f.read_bytes()
        for f in folder.iterdir()
        if f.is_file() and _suffix(f.name) in _TYPES and not f.name.startswith(".")
    }


def _asset(name: str) -> bytes | None:
    return _files().get(name)


def _suffix(name: str) -> str:
    dot = name.rfind(".")
    return name[dot:] if dot > 0 else ""


def _origins(url: str | None) -> str:
    """The CSP sources of the Supabase project: its origin over HTTP(S) and WebSocket."""
    if not url:
        return ""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return ""
    ws = "wss" if parts.scheme == "https" else "ws"
    return f" {parts.scheme}://{parts.netloc} {ws}://{parts.netloc}"


def csp(config: settings.Settings) -> str:
    """The page's Content-Security-Policy for this configuration."""
    return (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        f"connect-src 'self'{_origins(config.supabase_url)}; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )


def _headers(config: settings.Settings) -> dict[str, str]:
    return {
        "Content-Security-Policy": csp(config),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    }


def _shell(app: AppState) -> Response:
    body = _asset("index.html")
    if body is None:  # a broken install; say what is missing instead of a bare 500
        raise errors.NotFoundError("The jobs page is not installed (cpa_scheduler/ui is missing).")
    return Response(body, media_type=_TYPES[".html"], headers=_headers(app.config))


@router.get("")
async def ui_root() -> Response:
    return RedirectResponse("/ui/", status_code=308)


@router.get("/")
async def ui_jobs(app: AppState) -> Response:
    return _shell(app)


@router.get("/jobs/{job_id}")
async def ui_job(job_id: str, app: AppState) -> Response:
    return _shell(app)  # the page reads the id; the API answers 404 for another's job


@router.get("/schedules")
async def ui_schedules(app: AppState) -> Response:
    return _shell(app)


@router.get("/agents")
async def ui_agents(app: AppState) -> Response:
    return _shell(app)


@router.get("/assets/{name}")
async def ui_asset(name: str, app: AppState) -> Response:
    body = _asset(name)
    if body is None:
        raise errors.NotFoundError(f"The page has no file {name!r}.")
    return Response(body, media_type=_TYPES[_suffix(name)], headers=_headers(app.config))


@router.get("/config.json")
async def ui_config(app: AppState) -> dict[str, Any]:
    """What the page needs before sign-in: where Supabase is (the publishable key is public)."""
    url, key = app.config.supabase_url, app.config.supabase_publishable_key
    realtime = bool(url and key and _origins(url))
    return {
        "supabase_url": url.rstrip("/") if realtime and url else None,
        "supabase_publishable_key": key if realtime else None,
        "local": app.config.local,
    }


@router.get("/session")
async def ui_session(caller: CurrentCaller, session: UserSession) -> dict[str, Any]:
    """Who the page is signed in as, and in which tenant ("signed in as … in tenant …")."""
    tenants = [
        {"id": str(r["tenant_id"]), "name": r["name"], "role": r["role"]}
        for r in await session.my_memberships()
    ]
    current = next((t for t in tenants if t["id"] == str(caller.tenant_id)), None)
    return {
        "user_id": str(caller.claims.sub),
        "email": caller.claims.email,
        "tenant_id": str(caller.tenant_id),
        "tenant_name": current["name"] if current else None,
        "role": current["role"] if current else None,
        "tenants": tenants,
    }
