"""The reference desktop agent: claims desktop ToDos, agrees, performs, answers done or failure.

It opens apps and shows reminders by printing them, and reads and writes files only inside
its sandbox folder (:class:`cpa_scheduler.sandbox.Sandbox`). ``cpa-scheduler agent`` runs it.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from cpa_scheduler import client as client_mod
from cpa_scheduler import errors, protocol

ACTIONS = ["desktop.open_app", "file.write", "file.read", "notes.create", "reminder.create"]
# The agent answers every assignment within this long: an action stuck in the file system
# (a hung network drive) is reported as failed and the agent goes on.
ACTION_SECONDS = 30.0


def perform(assign: protocol.Assign, sandbox: Path) -> Any:
    """The safe built-in subset a reference agent performs (files: see sandbox.Sandbox)."""
    from cpa_scheduler.sandbox import Sandbox

    p = assign.payload.params
    if assign.payload.action == "desktop.open_app":
        print(f"agent: open app {p['app']!r}", file=sys.stderr)
        return {"opened": p["app"]}
    if assign.payload.action == "reminder.create":
        # The reference agent has no reminder app: it shows the reminder by printing it.
        print(f"agent: reminder at {p['at']}: {p['text']}", file=sys.stderr)
        return {"scheduled": p["at"], "text": p["text"]}
    if assign.payload.action in ("file.write", "file.read", "notes.create"):
        name = str(p.get("path") or f"notes/{assign.payload.todo_id}.md")
        box = Sandbox(sandbox)
        if assign.payload.action == "file.read":
            return {"text": box.read(name)}
        content = p.get("content", p.get("text", ""))
        text = content if isinstance(content, str) else json.dumps(content)
        return box.write(name, text.encode("utf-8", "backslashreplace"))
    raise errors.PermanentError(f"This agent cannot perform {assign.payload.action!r}.")


async def perform_bounded(assign: protocol.Assign, sandbox: Path) -> Any:
    """:func:`perform` off the event loop, given up after ACTION_SECONDS."""
    try:
        return await asyncio.wait_for(asyncio.to_thread(perform, assign, sandbox), ACTION_SECONDS)
    except TimeoutError:
        raise errors.PermanentError(
            f"The action {assign.payload.action!r} did not finish within {ACTION_SECONDS:g} s "
            "on this computer."
        ) from None


async def serve(
    c: client_mod.Client, agent_id: str, sandbox: Path, *, once: bool, poll: float
) -> int:
    """Offer the actions, then claim and answer assignments; returns how many it handled
    (only when ``once``: otherwise it runs until cancelled)."""
    handled = 0
    offer = protocol.make("offer", {"agent_id": agent_id, "name": "reference agent",
                                    "actions": ACTIONS}, sender=agent_id, receiver="scheduler")  # fmt: skip
    await c.send(offer)
    while True:
        for assign in await c.claim(agent_id, ACTIONS, limit=5):
            trace = assign.payload.traceparent
            await c.send(
                protocol.reply_to(assign, "agree", {"todo_id": assign.payload.todo_id}),
                traceparent=trace,
            )
            try:
                result = await perform_bounded(assign, sandbox)
                reply = protocol.reply_to(
                    assign, "done", {"todo_id": assign.payload.todo_id, "result": result}
                )
            except (errors.CpaError, OSError) as exc:
                # Never an OSError's text: it may hold the agent's absolute paths.
                text = exc.message if isinstance(exc, errors.CpaError) else (
                    f"The action failed on this computer ({type(exc).__name__}, "
                    f"errno {exc.errno})."
                )  # fmt: skip
                reply = protocol.reply_to(
                    assign, "failure", {"todo_id": assign.payload.todo_id, "error": text}
                )
            answer = await c.send(reply, traceparent=trace)
            handled += 1
            print(f"agent: {assign.payload.key} -> {reply.type} ({answer.type})", file=sys.stderr)
        if once:
            return handled
        await asyncio.sleep(poll)
