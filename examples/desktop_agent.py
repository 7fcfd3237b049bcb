"""A bare desktop agent for CPA Scheduler: woken by push, claims, agrees, performs, answers.

    export CPA_API_URL=https://<api>   CPA_TOKEN=<the user's access token>
    export SUPABASE_URL=https://<ref>.supabase.co SUPABASE_PUBLISHABLE_KEY=sb_publishable_...  # optional
    python examples/desktop_agent.py [--agent-id my-laptop] [--once]

The rules (docs/desktop.md):
- The agent id is bound to the user who first registers it in the tenant; another user's token
  using it gets 403.
- Wake-up: with Realtime configured it joins the private topic
  'tenant:<tenant_id>:agents:<user_id>' (GET /v1/agents names both) and claims on each
  'todo_ready' broadcast, plus once a minute (the server then knows the agent is online, and a
  timed ToDo is found); without Realtime each claim long-polls ('wait': 20), so an idle agent
  makes three requests a minute.
- Claim: POST /v1/agents/claim answers 'assign' messages; answer each with 'agree', then 'done'
  (or 'failure') to POST /v1/messages before its lease ends (reply_by).
- Offline: just stop; unanswered ToDos go back to ready when their lease expires.
This example only prints what it would do ('desktop.open_app' and 'reminder.create'); the
reference agent (cpa-scheduler agent) also writes files into a sandbox. --once handles the
first ToDo it gets and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import uuid
from typing import Any

import httpx

ACTIONS = ["desktop.open_app", "reminder.create"]
HEARTBEAT = 60.0


def message(
    kind: str, assign: dict[str, Any], agent_id: str, payload: dict[str, Any]
) -> dict[str, Any]:
    return {"id": str(uuid.uuid4()), "type": kind, "sender": agent_id, "receiver": "scheduler",
            "conversation_id": assign["conversation_id"], "in_reply_to": assign["id"],
            "trace_id": assign.get("trace_id"), "payload": payload}  # fmt: skip


async def claim(http: httpx.AsyncClient, agent_id: str, wait: float) -> int:
    """Claim, perform and answer; the number of ToDos handled."""
    body = {"agent_id": agent_id, "actions": ACTIONS, "limit": 5, "wait": wait}
    assigns = (await http.post("/v1/agents/claim", json=body)).raise_for_status().json()
    for assign in assigns:
        p = assign["payload"]
        await http.post(
            "/v1/messages", json=message("agree", assign, agent_id, {"todo_id": p["todo_id"]})
        )
        if p["action"] == "desktop.open_app":
            print(f"open app {p['params']['app']!r}", flush=True)
            reply = message(
                "done",
                assign,
                agent_id,
                {"todo_id": p["todo_id"], "result": {"opened": p["params"]["app"]}},
            )
        elif p["action"] == "reminder.create":
            print(f"reminder at {p['params']['at']}: {p['params']['text']}", flush=True)
            reply = message(
                "done", assign, agent_id, {"todo_id": p["todo_id"], "result": {"shown": True}}
            )
        else:
            reply = message("failure", assign, agent_id,
                            {"todo_id": p["todo_id"], "error": f"cannot {p['action']}", "retryable": False})  # fmt: skip
        answer = (await http.post("/v1/messages", json=reply)).raise_for_status().json()
        print(f"{p['key']} -> {reply['type']} ({answer['type']})", flush=True)
    return len(assigns)


async def long_poll(http: httpx.AsyncClient, agent_id: str, once: bool) -> None:
    failures = 0
    while True:
        try:
            handled = await claim(http, agent_id, wait=20)
            failures = 0
        except httpx.TransportError as exc:  # the API is away: back off, never a busy loop
            failures += 1
            print(f"API unreachable ({exc or type(exc).__name__}); retrying", file=sys.stderr)
            await asyncio.sleep(min(60.0, 2.0**failures))
            continue
        if once and handled:
            return


async def pushed(http: httpx.AsyncClient, agent_id: str, token: str, once: bool) -> None:
    from realtime import RealtimeSubscribeStates

    from supabase import AsyncClientOptions, acreate_client

    me = (await http.get("/v1/agents")).raise_for_status().json()
    sb = await acreate_client(os.environ["SUPABASE_URL"], os.environ["SUPABASE_PUBLISHABLE_KEY"],
                              AsyncClientOptions(auto_refresh_token=False, persist_session=False))  # fmt: skip
    await sb.realtime.set_auth(token)  # before subscribing: the join carries the user's token
    wake: asyncio.Queue[str] = asyncio.Queue()
    channel = sb.channel(
        f"tenant:{me['tenant_id']}:agents:{me['user_id']}", {"config": {"private": True}}
    )
    channel.on_broadcast("todo_ready", lambda _m: wake.put_nowait("todo_ready"))

    def on_state(state: RealtimeSubscribeStates, error: Exception | None) -> None:
        if state == RealtimeSubscribeStates.SUBSCRIBED:
            wake.put_nowait("joined")  # (re)joined: claim, something may have been missed
        elif error is not None:
            print(f"channel {state.value}: {error}", file=sys.stderr)

    await asyncio.wait_for(channel.subscribe(on_state), 10)
    try:
        while True:
            try:
                await asyncio.wait_for(wake.get(), HEARTBEAT)
            except TimeoutError:
                pass  # the heartbeat: one claim a minute
            while (handled := await claim(http, agent_id, wait=0)) == 5:
                pass
            if once and handled:
                return
    finally:
        await sb.remove_all_channels()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agent-id", default=f"example-{socket.gethostname()}")
    ap.add_argument("--once", action="store_true", help="exit after the first ToDo handled")
    args = ap.parse_args()
    token = os.environ["CPA_TOKEN"]
    async with httpx.AsyncClient(base_url=os.environ.get("CPA_API_URL", "http://127.0.0.1:8000"),
                                 headers={"Authorization": f"Bearer {token}"},
                                 timeout=httpx.Timeout(30, read=60)) as http:  # fmt: skip
        if os.environ.get("SUPABASE_URL") and os.environ.get("SUPABASE_PUBLISHABLE_KEY"):
            try:
                await pushed(http, args.agent_id, token, args.once)
                return
            except Exception as exc:  # Realtime unreachable or the join refused
                print(
                    f"Realtime unavailable ({exc or type(exc).__name__}); long-polling",
                    file=sys.stderr,
                )
        await long_poll(http, args.agent_id, args.once)


if __name__ == "__main__":
    asyncio.run(main())
