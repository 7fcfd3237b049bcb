"""TEST DOUBLE of Supabase Realtime: a minimal Phoenix-channels websocket server for the tests.

Hosted Realtime cannot run here. This double speaks the part of its protocol (vsn 1.0.0, JSON
frames) that the ``supabase`` package's realtime client uses for private broadcast channels,
and takes every decision from the real database, as Realtime does:

- ``phx_join`` carries the user's access token; the double verifies it (HS256 test secret) and
  authorizes the private topic the way Realtime does: it inserts a probe row into
  ``realtime.messages`` and selects it back as ``authenticated`` with the token's claims and
  ``realtime.topic`` set, then rolls back. The migrations' RLS policy decides.
- Broadcasts are the rows the triggers write to ``realtime.messages``; the local ``realtime.send``
  NOTIFYs ``realtime_local`` with each row's id on commit, and the double relays that row to the
  sockets joined to its topic (``broadcast`` frames, as Realtime sends them).
- ``access_token`` frames replace a channel's token; when a channel's token expires the double
  closes the channel with Realtime's "Token has expired" system message.
- ``drop()`` cuts every socket, to test resuming; nothing is buffered for a dropped socket.

It is not Realtime: no presence, no postgres_changes, no replay, one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import psycopg
import websockets
from cpa_scheduler import auth, errors
from websockets.asyncio.server import Server, ServerConnection


@dataclass
class _Channel:
    topic: str  # without the "realtime:" prefix, e.g. "tenant:<uuid>"
    join_ref: str
    token: str
    expires: float
    expiry: asyncio.TimerHandle | None = None


@dataclass(eq=False)
class _Socket:
    ws: ServerConnection
    channels: dict[str, _Channel] = field(default_factory=dict)  # by full "realtime:..." topic


class RealtimeDouble:
    """Start with ``async with RealtimeDouble(db_url, secret, issuer) as rt``; ``rt.url``."""

    def __init__(self, db_url: str, secret: str, issuer: str) -> None:
        self.db_url = db_url
        self.verifier = auth.Verifier(hs256_secret=secret, issuer=issuer, leeway=0)
        self.joins: list[dict[str, Any]] = []  # every phx_join: topic, token, accepted
        self.token_updates: list[str] = []  # every access_token frame accepted
        self.closed_for_expiry: list[str] = []
        self.relayed = 0
        self._sockets: set[_Socket] = set()
        self._server: Server | None = None
        self._relay: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()
        self._refuse_until = 0.0

    @property
    def url(self) -> str:
        """The 'project URL' for the supabase client (it appends /realtime/v1/websocket)."""
        assert self._server is not None
        port = next(iter(self._server.sockets)).getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aenter__(self) -> RealtimeDouble:
        self._server = await websockets.serve(
            self._serve, "127.0.0.1", 0, process_request=self._gate
        )
        self._relay = asyncio.create_task(self._relay_loop())
        await asyncio.wait_for(self._listening.wait(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._relay is not None:
            self._relay.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._relay
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def _gate(self, conn: ServerConnection, request: Any) -> Any:
        if time.monotonic() < self._refuse_until:
            return conn.respond(503, "Realtime test double: refusing connections for a while\n")
        return None

    async def drop(self, refuse_for: float = 0.0) -> None:
        """Cut every client socket abruptly, as a network failure would, and refuse new
        connections for ``refuse_for`` seconds (events committed meanwhile reach nobody)."""
        self._refuse_until = time.monotonic() + refuse_for
        for sock in list(self._sockets):
            for ch in sock.channels.values():
                if ch.expiry:
                    ch.expiry.cancel()
            sock.channels.clear()
            sock.ws.transport.abort()
        self._sockets.clear()

    @property
    def joined(self) -> int:
        return sum(len(s.channels) for s in self._sockets)

    # protocol ---------------------------------------------------------------------------------

    async def _serve(self, ws: ServerConnection) -> None:
        sock = _Socket(ws)
        self._sockets.add(sock)
        try:
            async for raw in ws:
                msg = json.loads(raw)
                await self._on_message(sock, msg)
        except websockets.ConnectionClosed:
            pass
        finally:
            self._sockets.discard(sock)
            for ch in sock.channels.values():
                if ch.expiry:
                    ch.expiry.cancel()

    async def _send(self, sock: _Socket, frame: dict[str, Any]) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            await sock.ws.send(json.dumps(frame))

    async def _reply(
        self, sock: _Socket, msg: dict[str, Any], status: str, response: dict[str, Any]
    ) -> None:
        await self._send(sock, {"topic": msg["topic"], "event": "phx_reply", "ref": msg.get("ref"),
                                "join_ref": msg.get("join_ref"),
                                "payload": {"status": status, "response": response}})  # fmt: skip

    async def _on_message(self, sock: _Socket, msg: dict[str, Any]) -> None:
        event, topic = msg.get("event"), str(msg.get("topic", ""))
        if topic == "phoenix" and event == "heartbeat":
            await self._reply(sock, msg, "ok", {})
        elif event == "phx_join":
            await self._join(sock, msg)
        elif event == "access_token":
            await self._access_token(sock, msg)
        elif event == "phx_leave":
            ch = sock.channels.pop(topic, None)
            if ch and ch.expiry:
                ch.expiry.cancel()
            await self._reply(sock, msg, "ok", {})
        else:  # client broadcasts and presence: not needed by the scheduler's client
            await self._reply(sock, msg, "error", {"reason": f"unsupported event {event!r}"})

    async def _join(self, sock: _Socket, msg: dict[str, Any]) -> None:
        full = str(msg["topic"])
        topic = full.removeprefix("realtime:")
        payload = msg.get("payload") or {}
        token = str(payload.get("access_token") or "")
        private = bool((payload.get("config") or {}).get("private"))
        record = {"topic": topic, "token": token, "accepted": False}
        self.joins.append(record)
        if not private:
            await self._reply(sock, msg, "error", {"reason": "Only private channels here"})
            return
        try:
            claims = self.verifier.verify(token)
        except errors.AuthError as exc:
            await self._reply(sock, msg, "error", {"reason": f"Invalid token: {exc.message}"})
            return
        if not await asyncio.to_thread(self._authorized, claims.for_database(), topic):
            await self._reply(
                sock, msg, "error",
                {"reason": "You do not have permissions to read from this Channel topic: "
                           + topic},
            )  # fmt: skip
            return
        record["accepted"] = True
        ch = _Channel(topic, str(msg.get("join_ref") or msg.get("ref")), token, float(claims.exp))
        old = sock.channels.pop(full, None)
        if old and old.expiry:
            old.expiry.cancel()
        sock.channels[full] = ch
        self._arm_expiry(sock, full, ch)
        await self._reply(sock, msg, "ok", {"postgres_changes": []})

    async def _access_token(self, sock: _Socket, msg: dict[str, Any]) -> None:
        full = str(msg["topic"])
        ch = sock.channels.get(full)
        token = str((msg.get("payload") or {}).get("access_token") or "")
        if ch is None:
            return
        try:
            claims = self.verifier.verify(token)
        except errors.AuthError:
            await self._close_channel(sock, full, "Invalid token")
            return
        self.token_updates.append(token)
        ch.token, ch.expires = token, float(claims.exp)
        self._arm_expiry(sock, full, ch)

    def _arm_expiry(self, sock: _Socket, full: str, ch: _Channel) -> None:
        if ch.expiry:
            ch.expiry.cancel()
        delay = max(0.0, ch.expires - time.time())
        loop = asyncio.get_running_loop()
        ch.expiry = loop.call_later(
            delay, lambda: asyncio.ensure_future(self._expire(sock, full, ch))
        )

    async def _expire(self, sock: _Socket, full: str, ch: _Channel) -> None:
        if sock.channels.get(full) is not ch:
            return
        self.closed_for_expiry.append(ch.topic)
        await self._close_channel(sock, full, "Token has expired 0 seconds ago")

    async def _close_channel(self, sock: _Socket, full: str, why: str) -> None:
        ch = sock.channels.pop(full, None)
        if ch and ch.expiry:
            ch.expiry.cancel()
        ref = ch.join_ref if ch else None
        await self._send(sock, {"topic": full, "event": "system", "ref": None, "payload": {
            "status": "error", "message": why, "extension": "system", "channel": full}})  # fmt: skip
        await self._send(sock, {"topic": full, "event": "phx_close", "ref": ref, "payload": {}})

    # database ---------------------------------------------------------------------------------

    def _authorized(self, claims: dict[str, Any], topic: str) -> bool:
        """Realtime's read check: a probe row selected back under the caller's claims."""
        with psycopg.connect(self.db_url) as conn:
            probe = uuid.uuid4()
            conn.execute(
                "insert into realtime.messages (id, topic, extension, payload, event, private)"
                " values (%s, %s, 'broadcast', '{}', 'probe', true)",
                (probe, topic),
            )
            conn.execute("set local role authenticated")
            conn.execute(
                "select set_config('request.jwt.claims', %s, true),"
                " set_config('realtime.topic', %s, true)",
                (json.dumps(claims), topic),
            )
            row = conn.execute(
                "select count(*) from realtime.messages where id = %s", (probe,)
            ).fetchone()
            conn.rollback()
        return bool(row and row[0] == 1)

    async def _relay_loop(self) -> None:
        async with await psycopg.AsyncConnection.connect(self.db_url, autocommit=True) as listen:
            reader = await psycopg.AsyncConnection.connect(self.db_url, autocommit=True)
            try:
                await listen.execute("listen realtime_local")
                self._listening.set()
                async for note in listen.notifies():
                    info = json.loads(note.payload)
                    cur = await reader.execute(
                        "select payload, event from realtime.messages where id = %s",
                        (info["id"],),
                    )
                    row = await cur.fetchone()
                    if row is not None:
                        await self._fan_out(info["topic"], row[1], row[0])
            finally:
                await reader.close()

    async def _fan_out(self, topic: str, event: str, payload: dict[str, Any]) -> None:
        full = f"realtime:{topic}"
        frame = {"topic": full, "event": "broadcast", "ref": None,
                 "payload": {"type": "broadcast", "event": event, "payload": payload,
                             "meta": {"id": str(uuid.uuid4())}}}  # fmt: skip
        for sock in list(self._sockets):
            if full in sock.channels:
                self.relayed += 1
                await self._send(sock, frame)
