"""A TCP proxy in front of PostgreSQL that can drop every connection or play dead.

``cut()`` closes every open connection (what a restart or a network blip does to clients);
``down()`` also makes new connections hang without an answer (a database that is unreachable,
not refusing); ``refuse()`` resets new connections at once (a stopped database);
``blackhole()`` stops forwarding without closing anything (packets dropped on the way, no
reset: open connections stay open and get no answer, new ones hang); ``up()`` restores
forwarding (connections that lost data in the black hole are reset, as their peers would
find them broken).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from psycopg.conninfo import conninfo_to_dict, make_conninfo


@dataclass
class Proxy:
    target_host: str
    target_port: int
    port: int = 0
    alive: bool = True
    refusing: bool = False
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _stalled: list[asyncio.StreamWriter] = field(default_factory=list)
    dropping: bool = False
    _tainted: set[asyncio.StreamWriter] = field(default_factory=set)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def url(self, url: str) -> str:
        params = conninfo_to_dict(url)
        params.update(host="127.0.0.1", port=str(self.port))
        return make_conninfo(**params)

    def cut(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def down(self) -> None:
        self.alive = False
        self.cut()

    def refuse(self) -> None:
        """Drop every connection and reset new ones at once (a database that is stopped)."""
        self.refusing = True
        self.down()

    def blackhole(self) -> None:
        """Stop forwarding without closing: open connections get no answer, new ones hang."""
        self.alive, self.dropping = False, True

    def up(self) -> None:
        self.alive, self.refusing, self.dropping = True, False, False
        for writer in [*self._stalled, *self._tainted]:
            writer.transport.abort()
        self._stalled.clear()
        self._tainted.clear()

    async def stop(self) -> None:
        self.cut()
        self.up()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.transport.abort()
            return
        if not self.alive:
            self._stalled.append(writer)  # accepted, never answered
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update({writer, up_writer})

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    if self.dropping:  # lost on the way: no answer, no reset
                        self._tainted.add(dst)
                        continue
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()
                self._writers.discard(dst)

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def start_for(url: str) -> tuple[Proxy, str]:
    """A started proxy for the server of ``url``, and ``url`` rewritten to go through it."""
    params = conninfo_to_dict(url)
    proxy = Proxy(str(params.get("host") or "127.0.0.1"), int(params.get("port") or 5432))
    await proxy.start()
    return proxy, proxy.url(url)
