"""Follow a CPA Scheduler job over Supabase Realtime with supabase-py, filling gaps from the API.

    export SUPABASE_URL=https://<ref>.supabase.co
    export SUPABASE_PUBLISHABLE_KEY=sb_publishable_...      # or the legacy anon key
    export CPA_API_URL=https://<api>   CPA_TOKEN=<the user's access token>
    python examples/follow_job_realtime.py <job id>

The rules (docs/desktop.md): join the private topic 'tenant:<tenant_id>' with the user's token,
keep the events of this job, skip ids already seen, and after every (re)join ask the API for
the events after the highest id seen. The cpa_scheduler client (Client.events) does the same
and more (token refresh, a quiet-time check, SSE fallback); this is the bare version.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

import httpx
from realtime import RealtimeSubscribeStates

from supabase import AsyncClientOptions, acreate_client

TERMINAL = {"done", "failed", "cancelled"}


async def follow(job_id: str) -> str:
    api, token = os.environ["CPA_API_URL"].rstrip("/"), os.environ["CPA_TOKEN"]
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=api, headers=headers, timeout=30) as http:
        job = (await http.get(f"/v1/jobs/{job_id}")).raise_for_status().json()
        seen: set[int] = set()
        last = 0
        # One queue for joins and broadcasts, handled in arrival order: a join's catch-up
        # finishes before the broadcasts that arrived meanwhile, so events stay in id order.
        inbox: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

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

        async def catch_up() -> bool:
            """The events after `last` from the API; True when the job has ended."""
            while True:
                page = (
                    (await http.get(f"/v1/jobs/{job_id}/events", params={"after": last, "wait": 0}))
                    .raise_for_status()
                    .json()
                )
                if deliver_all(page["events"]) or page["done"]:
                    return True
                if not page["events"]:
                    return False

        def on_state(state: RealtimeSubscribeStates, error: Exception | None) -> None:
            if state == RealtimeSubscribeStates.SUBSCRIBED:
                inbox.put_nowait(("joined", None))  # first join, or a rejoin after a drop
            elif error is not None:
                print(f"channel {state.value}: {error}", file=sys.stderr)

        sb = await acreate_client(
            os.environ["SUPABASE_URL"],
            os.environ["SUPABASE_PUBLISHABLE_KEY"],
            AsyncClientOptions(auto_refresh_token=False, persist_session=False),
        )
        await sb.realtime.set_auth(token)  # before subscribing: the join carries the token
        channel = sb.channel(f"tenant:{job['tenant_id']}", {"config": {"private": True}})
        channel.on_broadcast("job_events", lambda m: inbox.put_nowait(("broadcast", m)))
        await channel.subscribe(on_state)
        try:
            while True:
                kind, message = await inbox.get()
                if kind == "joined":
                    if await catch_up():
                        break
                elif deliver_all(message["payload"].get("events", [])):
                    break
        finally:
            await sb.remove_all_channels()
        return str((await http.get(f"/v1/jobs/{job_id}")).json()["status"])


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: follow_job_realtime.py <job id>")
    status = asyncio.run(follow(sys.argv[1]))
    sys.exit(0 if status == "done" else 1)
