"""The reference desktop agent: claims desktop ToDos, agrees, performs, answers done or failure.

It opens apps and shows reminders by printing them, and reads and writes files only inside
its sandbox folder (:class:`cpa_scheduler.sandbox.Sandbox`). ``cpa-scheduler agent`` runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from cpa_scheduler import client as client_mod
from cpa_scheduler import errors, protocol

_T = TypeVar("_T")
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


WAIT = 20.0  # seconds one long-polling claim waits for work (the server's bound)
HEARTBEAT = 60.0  # with Realtime: one claim a minute says "online" and finds timed ToDos
BACKOFF_MAX = 60.0


async def serve(
    c: client_mod.Client,
    agent_id: str,
    sandbox: Path,
    *,
    once: bool,
    wait: float = WAIT,
    heartbeat: float = HEARTBEAT,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """Offer the actions, then claim and answer assignments; returns how many it handled
    (only when ``once``: otherwise it runs until cancelled).

    Woken by push, never by a busy poll: with Realtime configured (``c.realtime``) it joins
    the private topic ``tenant:<t>:agents:<user>`` and claims when a ``todo_ready`` arrives,
    plus one claim per ``heartbeat`` (it tells the server the agent is online); otherwise, or
    while Realtime is unreachable, each claim long-polls for up to ``wait`` seconds. Failures
    back off exponentially up to a minute."""
    worker = _Worker(c, agent_id, sandbox)
    await _retrying(lambda: worker.offer())
    if once:
        return await worker.claim_and_handle(wait=0)
    if c.realtime is None:
        await worker.long_poll(wait, until=None, clock=clock)
    failures = 0
    while True:
        try:
            await worker.pushed(heartbeat, clock=clock)
            failures = 0
        except errors.UnavailableError as exc:
            failures += 1
            pause = min(300.0, wait * 2**failures)
            print(f"agent: Realtime unavailable ({exc.message}); long-polling for "
                  f"{pause:g} s, then trying Realtime again", file=sys.stderr)  # fmt: skip
            await worker.long_poll(wait, until=clock() + pause, clock=clock)


async def _retrying(call: Callable[[], Awaitable[_T]]) -> _T:
    """``call()``, again after an unreachable server or database, backing off to a minute."""
    failures = 0
    while True:
        try:
            return await call()
        except errors.UnavailableError as exc:
            failures += 1
            pause = min(BACKOFF_MAX, 0.5 * 2**failures)
            print(f"agent: {exc.message} Retrying in {pause:g} s.", file=sys.stderr)
            await asyncio.sleep(pause)


class _Worker:
    def __init__(self, c: client_mod.Client, agent_id: str, sandbox: Path) -> None:
        self.c, self.agent_id, self.sandbox = c, agent_id, sandbox

    async def offer(self) -> None:
        offer = protocol.make("offer", {"agent_id": self.agent_id, "name": "reference agent",
                                        "actions": ACTIONS}, sender=self.agent_id,
                              receiver="scheduler")  # fmt: skip
        await self.c.send(offer)

    async def claim_and_handle(self, *, wait: float) -> int:
        assigns = await _retrying(lambda: self.c.claim(self.agent_id, ACTIONS, 5, wait=wait))
        for assign in assigns:
            await _retrying(lambda a=assign: self.handle(a))  # type: ignore[misc]
        return len(assigns)

    async def long_poll(
        self, wait: float, *, until: float | None, clock: Callable[[], float]
    ) -> None:
        while until is None or clock() < until:
            started = clock()
            if not await self.claim_and_handle(wait=wait) and clock() - started < min(1.0, wait):
                # An empty answer long before the bound (a server without long-polling):
                # never a busy loop.
                await asyncio.sleep(max(1.0, wait))

    async def pushed(self, heartbeat: float, *, clock: Callable[[], float]) -> None:
        """Claim on each (re)join, each wake-up and once per ``heartbeat``; raises
        UnavailableError when the channel cannot be (re)joined."""
        me = await _retrying(lambda: self.c.agents())
        inbox: asyncio.Queue[dict[str, Any] | BaseException] = asyncio.Queue()

        async def pump() -> None:
            # The subscription runs on its own: waiting for the heartbeat with a timeout must
            # never cancel (and so close) the channel's generator.
            try:
                async for item in self.c.wakeups(str(me["tenant_id"]), str(me["user_id"])):
                    inbox.put_nowait(item)
                inbox.put_nowait(errors.UnavailableError("The Realtime channel closed."))
            except Exception as exc:
                inbox.put_nowait(exc)

        pumping = asyncio.create_task(pump())
        joined = False
        due = clock()
        try:
            while True:
                try:
                    item = await asyncio.wait_for(
                        inbox.get(), max(0.0, due - clock()) if joined else None
                    )
                except TimeoutError:
                    item = {}  # the heartbeat is due
                if isinstance(item, BaseException):
                    raise item
                joined = joined or bool(item.get("joined"))
                if not joined:
                    continue
                while not inbox.empty():  # wake-ups this claim answers too
                    more = inbox.get_nowait()
                    if isinstance(more, BaseException):
                        raise more
                # Claim until empty: one wake-up may stand for several ToDos.
                while await self.claim_and_handle(wait=0) == 5:
                    pass
                due = clock() + heartbeat
        finally:
            pumping.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pumping

    async def handle(self, assign: protocol.Assign) -> None:
        c, trace = self.c, assign.payload.traceparent
        await c.send(
            protocol.reply_to(assign, "agree", {"todo_id": assign.payload.todo_id}),
            traceparent=trace,
        )
        try:
            result = await perform_bounded(assign, self.sandbox)
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
        print(f"agent: {assign.payload.key} -> {reply.type} ({answer.type})", file=sys.stderr)
