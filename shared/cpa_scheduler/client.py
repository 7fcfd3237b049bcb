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
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Any

import httpx

from cpa_scheduler import errors, transport
from cpa_scheduler import events as events_mod

if TYPE_CHECKING:
    from supabase import AsyncClient as SupabaseClient


log = logging.getLogger(__name__)
TERMINAL = events_mod.TERMINAL
# The client's vocabulary, by the names its users know (client.RealtimeConfig, ...).
RealtimeConfig = transport.RealtimeConfig
TokenProvider = transport.TokenProvider
token_expiry = transport.token_expiry
supabase_refresher = transport.supabase_refresher


class Client(transport.Transport):
    """Async client; use as ``async with Client(url, token) as c``."""

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
                        transport._raise_for(response)
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
