"""The HTTP side of the API client: its calls (jobs, schedules, agents, protocol messages), the
error mapping of its answers, and the access token with its refresh. Following a job's events
is :mod:`cpa_scheduler.client`'s."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

import httpx
import jwt

from cpa_scheduler import errors, protocol

if TYPE_CHECKING:
    from supabase import AsyncClient as SupabaseClient


log = logging.getLogger("cpa_scheduler.client")
TokenProvider = Callable[[], Awaitable[str]]
_BY_STATUS: dict[int, type[errors.CpaError]] = {
    401: errors.AuthError,
    403: errors.ForbiddenError,
    404: errors.NotFoundError,
    409: errors.ConflictError,
    413: errors.InvalidError,
    422: errors.InvalidError,
    503: errors.UnavailableError,
}


@dataclass(frozen=True)
class RealtimeConfig:
    """Where Supabase Realtime is: the project URL and its publishable (anon) key."""

    url: str
    key: str
    # How long to wait for a (re)join before following over the API instead.
    join_timeout: float = 10.0
    # Ask the API for missed events this often while the channel is quiet: Realtime
    # delivers at most once, so a message lost in transit is found within this time.
    check_every: float = 30.0
    reconnect_backoff: float = 1.0


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        body = response.json()
        detail = body.get("detail") or response.text
        field_errors = body.get("errors")
    except ValueError:
        detail, field_errors = response.text or response.reason_phrase, None
    if response.status_code == 429:
        wait = float(response.headers.get("Retry-After", "1"))
        raise errors.RateLimitedError(str(detail), retry_after=wait)
    cls = _BY_STATUS.get(response.status_code, errors.CpaError)
    raise cls(str(detail), errors=field_errors if isinstance(field_errors, list) else None)


def token_expiry(token: str) -> tuple[float, float] | None:
    """(issued at, expires at) of an access token, read without verifying it; None if unknown.

    The client only schedules its refresh by these; the server verifies every token.
    """
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    exp = claims.get("exp")
    if not isinstance(exp, int | float):
        return None
    iat = claims.get("iat")
    return (float(iat) if isinstance(iat, int | float) else time.time(), float(exp))


def supabase_refresher(url: str, key: str, refresh_token: str) -> TokenProvider:
    """A token provider that refreshes a Supabase Auth session (refresh tokens rotate)."""
    state = {"refresh_token": refresh_token}

    async def refresh() -> str:
        async with httpx.AsyncClient(timeout=10) as http:
            response = await http.post(
                url.rstrip("/") + "/auth/v1/token",
                params={"grant_type": "refresh_token"},
                headers={"apikey": key},
                json={"refresh_token": state["refresh_token"]},
            )
        if response.status_code >= 400:
            raise errors.AuthError(
                f"Supabase Auth refused to refresh the session ({response.status_code}: "
                f"{response.text[:200]}); sign in again to get a new refresh token."
            )
        body = response.json()
        state["refresh_token"] = body.get("refresh_token") or state["refresh_token"]
        return str(body["access_token"])

    return refresh


class Transport:
    """The API's calls over HTTP and the access token they carry (renewed by a provider);
    :class:`cpa_scheduler.client.Client` adds following events."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
        realtime: RealtimeConfig | None = None,
        token_provider: TokenProvider | None = None,
        refresh_margin: float = 60.0,
    ) -> None:
        self.token = token
        self.realtime = realtime
        self._provider = token_provider
        self._margin = refresh_margin
        self._refresher: asyncio.Task[None] | None = None
        self._supabase: SupabaseClient | None = None
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(timeout, read=None),
            transport=transport,
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None
        await self._http.aclose()

    # tokens -------------------------------------------------------------------------------

    async def set_token(self, token: str) -> None:
        """Use a new access token for the API and for joined Realtime channels."""
        self.token = token
        self._http.headers["Authorization"] = f"Bearer {token}"
        if self._supabase is not None:
            await self._supabase.realtime.set_auth(token)

    def _start_refresh(self) -> None:
        if self._provider is not None and self._refresher is None:
            self._refresher = asyncio.create_task(self._refresh_loop())

    async def _refresh_loop(self) -> None:
        provider = self._provider
        if provider is None:
            return  # nothing to renew the token with
        while True:
            times = token_expiry(self.token)
            if times is None:
                return  # nothing says when it expires: the server's 401 will tell
            issued, expires = times
            # Well before expiry: at most `margin` ahead, or halfway for short-lived tokens.
            ahead = min(self._margin, (expires - issued) / 2)
            await asyncio.sleep(max(0.0, expires - ahead - time.time()))
            try:
                await self.set_token(await provider())
            except (errors.CpaError, httpx.HTTPError) as exc:
                log.warning("token refresh failed, retrying in 5 s: %s", exc)
                await asyncio.sleep(5)

    async def _call(self, method: str, path: str, **kw: Any) -> Any:
        self._start_refresh()
        try:
            response = await self._http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise errors.UnavailableError(
                f"The scheduler at {self._http.base_url} is unreachable ({exc}); is it running? "
                "Start it with 'make run' or set CPA_API_URL."
            ) from None
        _raise_for(response)
        return response.json() if response.content else None

    # jobs ---------------------------------------------------------------------------------

    async def submit(
        self,
        text: str | None = None,
        *,
        graph: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        time_zone: str | None = None,
        run_at: str | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"request": text} if graph is None else {"graph": graph}
        if time_zone:
            body["time_zone"] = time_zone
        if run_at:
            body["run_at"] = run_at
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        result: dict[str, Any] = await self._call("POST", "/v1/jobs", json=body, headers=headers)
        return result

    async def get(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("GET", f"/v1/jobs/{job_id}")
        return result

    async def jobs(
        self, *, status: str | None = None, limit: int = 50, cursor: str | None = None
    ) -> dict[str, Any]:
        """One page of the tenant's jobs, newest first: ``{"jobs", "next_cursor"}``."""
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        if cursor:
            params["cursor"] = cursor
        result: dict[str, Any] = await self._call("GET", "/v1/jobs", params=params)
        return result

    # schedules ----------------------------------------------------------------------------

    async def schedule_add(
        self, cron: str, *, time_zone: str = "UTC", request: str | None = None,
        graph: dict[str, Any] | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        body: dict[str, Any] = {"cron": cron, "time_zone": time_zone}
        body |= {"request": request} if graph is None else {"graph": graph}
        result: dict[str, Any] = await self._call("POST", "/v1/schedules", json=body)
        return result

    async def schedules(self) -> list[dict[str, Any]]:
        result: dict[str, Any] = await self._call("GET", "/v1/schedules")
        return list(result["schedules"])

    async def schedule_pause(self, schedule_id: str, *, paused: bool = True) -> dict[str, Any]:
        verb = "pause" if paused else "resume"
        result: dict[str, Any] = await self._call("POST", f"/v1/schedules/{schedule_id}/{verb}")
        return result

    async def schedule_delete(self, schedule_id: str) -> None:
        await self._call("DELETE", f"/v1/schedules/{schedule_id}")

    async def cancel(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("POST", f"/v1/jobs/{job_id}/cancel")
        return result

    async def retry(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("POST", f"/v1/jobs/{job_id}/retry")
        return result

    async def events_page(self, job_id: str, after: int = 0, wait: float = 0) -> dict[str, Any]:
        """One JSON long-poll: the events after ``after`` (waits up to ``wait`` s for one)."""
        params = {"after": after, "wait": wait}
        page: dict[str, Any] = await self._call("GET", f"/v1/jobs/{job_id}/events", params=params)
        return page

    # agents -------------------------------------------------------------------------------

    async def claim(
        self,
        agent_id: str,
        actions: Sequence[str] | None = None,
        limit: int = 10,
        *,
        wait: float = 0,
    ) -> list[protocol.Assign]:
        """Claim desktop ToDos; ``wait`` (at most 20 s) long-polls until there is work."""
        body: dict[str, Any] = {
            "agent_id": agent_id, "actions": list(actions) if actions else None, "limit": limit,
        }  # fmt: skip
        if wait:
            body["wait"] = wait
        rows = await self._call("POST", "/v1/agents/claim", json=body)
        out = []
        for row in rows:
            msg = protocol.parse(row)
            if not isinstance(msg, protocol.Assign):
                raise errors.ProtocolError(
                    f"The server answered a claim with a {msg.type!r} message; it must be assign."
                )
            out.append(msg)
        return out

    async def agents(self) -> dict[str, Any]:
        """``GET /v1/agents``: ``{"tenant_id", "user_id", "agents": [...]}`` (the caller's own
        agents; a tenant's owners and admins see all)."""
        result: dict[str, Any] = await self._call("GET", "/v1/agents")
        return result

    async def send(
        self, message: protocol.Message, *, traceparent: str | None = None
    ) -> protocol.Message:
        """Send any protocol message; returns the scheduler's answer.

        ``traceparent`` (an assign's ``payload.traceparent``) continues the job's trace."""
        headers = {"traceparent": traceparent} if traceparent else {}
        body = protocol.dump(message)
        return protocol.parse(await self._call("POST", "/v1/messages", json=body, headers=headers))
