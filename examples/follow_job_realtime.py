"""Follow a CPA Scheduler job over Supabase Realtime with supabase-py, filling gaps from the API.

    export SUPABASE_URL=https://<ref>.supabase.co
    export SUPABASE_PUBLISHABLE_KEY=sb_publishable_...      # or the legacy anon key
    export CPA_API_URL=https://<api>   CPA_TOKEN=<the user's access token>
    python examples/follow_job_realtime.py <job id>

The rules (docs/desktop.md): join the private topic 'tenant:<tenant_id>:user:<created_by>' (the
job's owner; a tenant's owners and admins may join it too) with the user's token, keep the
events of this job, skip ids already seen, and after every (re)join ask the API for the events
after the highest id seen. Without SUPABASE_URL, or when Realtime cannot be reached or joined,
it says why in one line and follows the job over the API's long-poll instead. The
cpa_scheduler client (Client.events) does the same and more (token refresh, a quiet-time
check, SSE); this is the bare version.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from realtime import RealtimeSubscribeStates

from supabase import AsyncClientOptions, acreate_client

TERMINAL = {"done", "failed", "cancelled"}


JOIN_TIMEOUT = 10.0


class Unreachable(Exception):
    """Realtime cannot be used; the message is the one-line reason."""


async def follow(job_id: str) -> str:
    api, token = os.environ["CPA_API_URL"].rstrip("/"), os.environ["CPA_TOKEN"]
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=api, headers=headers, timeout=60) as http:
        job = (await http.get(f"/v1/jobs/{job_id}")).raise_for_status().json()
        seen: set[int] = set()
        last = 0

        def deliver(event: dict[str, Any]) -> bool:
            """Show an event once; True when it was the job's last."""
            nonlocal last
            if event["job_id"] != job_id or event["id"] in seen:
                return False
            seen.add(event["id"])
            last = max(last, event["id"])
            print(json.dumps(event), flush=True)
            return event["kind"] == "job.status" and event["status"] in TERMINAL

        def deliver_all(events: list[dict[str, Any]]) -> bool:
            ended = False
            for event in events:
                ended = deliver(event) or ended
            return ended

        async def catch_up(wait: float = 0) -> bool:
            """The events after `last` from the API; True when the job has ended."""
            while True:
                params = {"after": last, "wait": wait}
                page = (
                    (await http.get(f"/v1/jobs/{job_id}/events", params=params))
                    .raise_for_status()
                    .json()
                )
                if deliver_all(page["events"]) or page["done"]:
                    return True
                if not page["events"]:
                    return False

        try:
            await over_realtime(job, token, catch_up, deliver_all)
        except Unreachable as exc:
            print(
                f"Realtime unavailable ({exc}); following job {job_id} over the API.",
                file=sys.stderr,
            )
            while not await catch_up(wait=20):  # a long-poll: answers as soon as events come
                pass
        return str((await http.get(f"/v1/jobs/{job_id}")).json()["status"])


async def over_realtime(
    job: dict[str, Any],
    token: str,
    catch_up: Callable[[], Awaitable[bool]],
    deliver_all: Callable[[list[dict[str, Any]]], bool],
) -> None:
    """Follow the job on its owner's topic until it ends; Unreachable when it cannot."""
    url, key = os.environ.get("SUPABASE_URL"), os.environ.get("SUPABASE_PUBLISHABLE_KEY")
    if not url or not key:
        raise Unreachable("SUPABASE_URL and SUPABASE_PUBLISHABLE_KEY are not set")
    # One queue for joins and broadcasts, handled in arrival order: a join's catch-up
    # finishes before the broadcasts that arrived meanwhile, so events stay in id order.
    inbox: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def on_state(state: RealtimeSubscribeStates, error: Exception | None) -> None:
        if state == RealtimeSubscribeStates.SUBSCRIBED:
            inbox.put_nowait(("joined", None))  # first join, or a rejoin after a drop
        else:
            inbox.put_nowait(("lost", f"{state.value}: {error or 'no reason given'}"))

    sb = await acreate_client(url, key, AsyncClientOptions(
        auto_refresh_token=False, persist_session=False, realtime={"max_retries": 2}))  # fmt: skip
    await sb.realtime.set_auth(token)  # before subscribing: the join carries the token
    owner = job.get("created_by")
    topic = f"tenant:{job['tenant_id']}" + (f":user:{owner}" if owner else "")
    channel = sb.channel(topic, {"config": {"private": True}})
    channel.on_broadcast("job_events", lambda m: inbox.put_nowait(("broadcast", m)))
    joined = False
    try:
        try:
            await asyncio.wait_for(channel.subscribe(on_state), JOIN_TIMEOUT)
        except Exception as exc:  # the realtime client raises plain exceptions (refused, DNS)
            raise Unreachable(
                f"{url} cannot be reached: {str(exc) or type(exc).__name__}"
            ) from None
        while True:
            try:
                kind, message = await asyncio.wait_for(
                    inbox.get(), None if joined else JOIN_TIMEOUT
                )
            except TimeoutError:
                raise Unreachable(f"{topic} was not joined within {JOIN_TIMEOUT:g} s") from None
            if kind == "joined":
                joined = True
                if await catch_up():
                    return
            elif kind == "lost" and not joined:
                raise Unreachable(f"joining {topic} failed ({message})")
            elif kind == "broadcast" and deliver_all(message["payload"].get("events", [])):
                return
    finally:
        with contextlib.suppress(Exception):
            await sb.remove_all_channels()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: follow_job_realtime.py <job id>")
    status = asyncio.run(follow(sys.argv[1]))
    sys.exit(0 if status == "done" else 1)
