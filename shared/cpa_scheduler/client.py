"""A Python client of the CPA Scheduler API, for CPA Desktop AI and the CLI.

Submit and follow jobs, and act as a desktop agent (claim assignments, reply with protocol
messages). Progress arrives over Supabase Realtime (the tenant's private broadcast topic) when
the project URL and its publishable key are configured, otherwise over SSE from the API. Either
way every event is delivered once, in id order, across reconnects: gaps are filled from the API
by event id (``Last-Event-ID`` or ``?after=``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
import jwt

from cpa_scheduler import errors, protocol
from cpa_scheduler import events as events_mod

if TYPE_CHECKING:
    from supabase import AsyncClient as SupabaseClient

log = logging.getLogger(__name__)
TERMINAL = events_mod.TERMINAL
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


class Client:
    """Async client; use as ``async with Client(url, token) as c``."""

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

    async def __aenter__(self) -> Client:
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

    async def events(
        self,
        job_id: str,
        *,
        last_event_id: int | None = None,
        reconnects: int = 20,
        tenant_id: str | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Progress events of a job, once each and in id order, until the job ends.

        Over Realtime when configured (falling back to the API if the channel cannot be
        joined), otherwise over SSE. ``last_event_id`` resumes after that event.
        """
        self._start_refresh()
        seen: set[int] = set()
        if self.realtime is not None:
            try:
                async for event in self._realtime_events(job_id, last_event_id, tenant_id, seen):
                    yield event
                return
            except _RealtimeUnavailable as exc:
                log.warning("Realtime unavailable, following job %s over the API: %s", job_id, exc)
            last_event_id = max(seen, default=last_event_id)
        async for event in self._sse_events(job_id, last_event_id, reconnects, seen):
            yield event

    async def events_page(self, job_id: str, after: int = 0, wait: float = 0) -> dict[str, Any]:
        """One JSON long-poll: the events after ``after`` (waits up to ``wait`` s for one)."""
        params = {"after": after, "wait": wait}
        page: dict[str, Any] = await self._call("GET", f"/v1/jobs/{job_id}/events", params=params)
        return page

    async def _sse_events(
        self, job_id: str, last: int | None, reconnects: int, seen: set[int]
    ) -> AsyncIterator[dict[str, Any]]:
        """SSE with resume: a buffered host (Lambda) closes each answer early; reconnect."""
        failures, retry = 0, 1.0
        while True:
            headers = {"Last-Event-ID": str(last)} if last is not None else {}
            got = ended = False
            try:
                async with self._http.stream(
                    "GET", f"/v1/jobs/{job_id}/events", headers=headers
                ) as response:
                    if response.status_code == 204:
                        return  # the job has ended and nothing follows `last`
                    if response.status_code >= 400:
                        await response.aread()
                        _raise_for(response)
                    failures = 0
                    async for field, value in _parse_sse(response.aiter_lines()):
                        if field == "retry":
                            retry = int(value) / 1000
                            continue
                        event = json.loads(value)
                        last, got = max(last or 0, int(event["id"])), True
                        if event["id"] in seen:
                            continue
                        seen.add(event["id"])
                        yield event
                        # The end only as the answer's last event: an earlier run's end (the
                        # job was retried) is followed by more, and the server goes on.
                        ended = events_mod.is_terminal(event)
            except (httpx.TransportError, httpx.RemoteProtocolError):
                failures += 1
                if failures > reconnects:
                    raise errors.UnavailableError(
                        f"The event stream of job {job_id} dropped {failures} times in a row; "
                        f"is the scheduler at {self._http.base_url} reachable?"
                    ) from None
                await asyncio.sleep(min(5.0, 0.2 * 2**failures))
                continue
            if ended:
                return
            # The answer ended before the job did (a bounded answer): resume from `last`.
            # Straight away when it brought events, else after the server's retry hint.
            if not got:
                await asyncio.sleep(retry)

    async def _fill(
        self, job_id: str, last: int, seen: set[int]
    ) -> tuple[list[dict[str, Any]], int, bool]:
        """Everything the API has after ``last``: (unseen events, new last, job ended)."""
        out: list[dict[str, Any]] = []
        while True:
            page = await self.events_page(job_id, after=last)
            for event in page["events"]:
                if event["id"] not in seen:
                    seen.add(event["id"])
                    out.append(event)
            last = max(last, int(page["last_event_id"]))
            if page["done"] or not page["events"]:
                return out, last, bool(page["done"])

    async def _realtime_events(
        self, job_id: str, last_event_id: int | None, tenant_id: str | None, seen: set[int]
    ) -> AsyncIterator[dict[str, Any]]:
        from realtime import RealtimeChannelOptions, RealtimeSubscribeStates

        config = self._realtime_config()
        # The job's events travel on its owner's user topic (a tenant's owners and admins may
        # join it too); a job without an owner only on the tenant's topic (admins).
        job = await self.get(job_id)
        tenant_id = str(job.get("tenant_id") or tenant_id)
        owner = job.get("created_by")
        topic = events_mod.user_topic(tenant_id, owner) if owner else events_mod.topic(tenant_id)
        inbox: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def on_broadcast(message: Any) -> None:
            for event in (message.get("payload") or {}).get("events") or []:
                if event.get("job_id") == job_id:
                    inbox.put_nowait(("event", event))

        def on_state(state: RealtimeSubscribeStates, error: Exception | None) -> None:
            inbox.put_nowait(("state", state))

        sb = await self._realtime_client()
        options: RealtimeChannelOptions = {
            "config": {
                "private": True,
                "broadcast": {"ack": False, "self": False},
                "presence": None,
            }
        }
        channel = sb.channel(topic, options)
        channel.on_broadcast(events_mod.TOPIC_EVENT, on_broadcast)
        try:
            try:
                await asyncio.wait_for(channel.subscribe(on_state), config.join_timeout)
            except Exception as exc:  # the realtime client raises plain Exceptions
                raise _RealtimeUnavailable(
                    f"joining {channel.topic} failed: {_cause(exc, config.join_timeout)}"
                ) from exc
            last = last_event_id or 0
            joined_at: float | None = None
            lost_at: float | None = None
            while True:
                wait = config.check_every if lost_at is None else config.join_timeout
                try:
                    kind, item = await asyncio.wait_for(inbox.get(), wait)
                except TimeoutError:
                    if lost_at is not None:
                        raise _RealtimeUnavailable(
                            f"no rejoin of {channel.topic} within {config.join_timeout} s"
                        ) from None
                    kind, item = "check", None
                if kind == "state":
                    if item != RealtimeSubscribeStates.SUBSCRIBED:
                        lost_at = lost_at or time.monotonic()
                        if item != RealtimeSubscribeStates.CHANNEL_ERROR:
                            # CLOSED or TIMED_OUT: the client will not rejoin by itself.
                            raise _RealtimeUnavailable(f"{channel.topic}: {item}")
                        continue
                    lost_at, joined_at = None, time.monotonic()
                if kind in ("state", "check"):
                    # Joined (first time or again after a drop) or quiet for a while: take
                    # what the API has that the channel did not bring.
                    missed, last, ended = await self._fill(job_id, last, seen)
                    for event in missed:
                        yield event
                    if ended:
                        return
                    continue
                if kind == "event" and joined_at is not None and item["id"] not in seen:
                    seen.add(item["id"])
                    last = max(last, int(item["id"]))
                    yield item
                    if events_mod.is_terminal(item):
                        return
        finally:
            with contextlib.suppress(Exception):
                await sb.remove_channel(channel)
            self._supabase = None

    def _realtime_config(self) -> RealtimeConfig:
        if self.realtime is None:
            raise errors.ConfigError(
                "Realtime is not configured; set SUPABASE_URL and SUPABASE_PUBLISHABLE_KEY."
            )
        return self.realtime

    async def _realtime_client(self) -> SupabaseClient:
        from supabase import AsyncClientOptions, acreate_client

        config = self._realtime_config()
        options = AsyncClientOptions(
            headers={"Authorization": f"Bearer {self.token}"},
            auto_refresh_token=False,
            persist_session=False,
            realtime={"initial_backoff": config.reconnect_backoff, "max_retries": 10},
        )
        sb = await acreate_client(config.url, config.key, options)
        # Before subscribing: the join must carry the user's token, not the publishable key.
        await sb.realtime.set_auth(self.token)
        self._supabase = sb
        return sb

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

    async def wakeups(self, tenant_id: str, user_id: str) -> AsyncGenerator[dict[str, Any], None]:
        """Realtime wake-ups for this user's desktop agents: ``{"joined": True}`` once the
        private topic ``tenant:<t>:agents:<u>`` is joined (and again after a rejoin), then each
        ``todo_ready`` payload (``todo_id, job_id, action``; never params). Raises
        :class:`errors.UnavailableError` naming the cause when the channel cannot be (re)joined.
        """
        from realtime import RealtimeChannelOptions, RealtimeSubscribeStates

        config = self._realtime_config()
        inbox: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        sb = await self._realtime_client()
        options: RealtimeChannelOptions = {
            "config": {
                "private": True,
                "broadcast": {"ack": False, "self": False},
                "presence": None,
            }
        }
        channel = sb.channel(events_mod.agents_topic(tenant_id, user_id), options)
        channel.on_broadcast(
            events_mod.WAKE_EVENT, lambda m: inbox.put_nowait(("wake", m.get("payload") or {}))
        )
        try:
            try:
                await asyncio.wait_for(
                    channel.subscribe(lambda state, e: inbox.put_nowait(("state", (state, e)))),
                    config.join_timeout,
                )
            except Exception as exc:  # the realtime client raises plain Exceptions
                raise errors.UnavailableError(
                    f"Joining {channel.topic} failed: {_cause(exc, config.join_timeout)}."
                ) from None
            lost_at: float | None = None
            joined = False
            while True:
                try:
                    kind, item = await asyncio.wait_for(
                        inbox.get(), None if lost_at is None else config.join_timeout
                    )
                except TimeoutError:
                    raise errors.UnavailableError(
                        f"{channel.topic} was not joined again within {config.join_timeout} s."
                    ) from None
                if kind == "wake":
                    yield dict(item)
                    continue
                state, error = item
                if state == RealtimeSubscribeStates.SUBSCRIBED:
                    lost_at, joined = None, True
                    yield {"joined": True}
                elif state == RealtimeSubscribeStates.CHANNEL_ERROR and joined:
                    lost_at = lost_at or time.monotonic()  # the client rejoins by itself
                else:  # refused at the first join (not this user's topic?), closed, timed out
                    cause = f": {_cause(error, config.join_timeout)}" if error else ""
                    raise errors.UnavailableError(
                        f"Joining {channel.topic} failed ({state}){cause}."
                    )
        finally:
            with contextlib.suppress(Exception):
                await sb.remove_channel(channel)
            self._supabase = None

    async def send(
        self, message: protocol.Message, *, traceparent: str | None = None
    ) -> protocol.Message:
        """Send any protocol message; returns the scheduler's answer.

        ``traceparent`` (an assign's ``payload.traceparent``) continues the job's trace."""
        headers = {"traceparent": traceparent} if traceparent else {}
        body = protocol.dump(message)
        return protocol.parse(await self._call("POST", "/v1/messages", json=body, headers=headers))


def _cause(exc: BaseException, timeout: float) -> str:
    """An exception as a cause a person can read (a bare TimeoutError has no text)."""
    if isinstance(exc, TimeoutError) and not str(exc):
        return f"no answer within {timeout:g} s"
    return str(exc).strip() or type(exc).__name__


class _RealtimeUnavailable(Exception):
    """The channel could not be joined or rejoined; the client follows over the API instead."""


async def _parse_sse(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str, str]]:
    """("retry", ms) and ("data", json) fields of an SSE stream, one per event."""
    data: list[str] = []
    async for line in lines:
        if line.startswith("data:"):
            data.append(line[5:].lstrip())
        elif line.startswith("retry:"):
            yield "retry", line[6:].strip()
        elif line == "" and data:
            yield "data", "\n".join(data)
            data = []
