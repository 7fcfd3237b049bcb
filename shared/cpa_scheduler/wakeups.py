"""Wake-ups for long-polling desktop claims (``POST /v1/agents/claim`` with ``wait``).

When a desktop ToDo becomes ready, ``private.agent_wake_v1`` NOTIFYs ``cpa_desktop_ready``
with ``<tenant_id>:<user_id>`` (the job's owner). One LISTEN connection per process (long-running
hosts: ``serve``, tests) sets the events of the claims waiting for that user; a claim then asks
the database again at once. Without a live listener (Lambda, or while it reconnects) a waiting
claim asks again instead: every :data:`POLL_SECONDS` for :data:`POLL_FAST_FOR` s, then every
:data:`POLL_SLOW_SECONDS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

from cpa_scheduler import store

log = logging.getLogger("cpa.wakeups")

CHANNEL = "cpa_desktop_ready"
POLL_SECONDS = 0.2  # a claim without a listener asks the database this often at first,
POLL_FAST_FOR = 2.0  # for this long,
POLL_SLOW_SECONDS = 1.0  # then this often
BACKOFF_MAX = 30.0


def user_of(payload: str) -> str:
    """The user a ``cpa_desktop_ready`` payload (``<tenant_id>:<user_id>``) wakes; claims wait
    by user, since their tenant is known only once they ask the database."""
    return payload.rpartition(":")[2]


class Listener:
    """The process's LISTEN connection and the events of the claims waiting on it."""

    def __init__(self, url: str, *, connect_timeout: float = 5.0) -> None:
        self.url = url
        self.connect_timeout = connect_timeout
        self._waiting: dict[str, set[asyncio.Event]] = {}
        self._task: asyncio.Task[None] | None = None
        self._live = asyncio.Event()
        self.stopping = False  # the host is shutting down: waiting claims answer now

    @property
    def listening(self) -> bool:
        """True while the LISTEN connection is up (otherwise claims poll)."""
        return self._live.is_set()

    def start(self) -> None:
        """Start listening in the running loop (once; a dead task is started again)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def ready(self, within: float) -> bool:
        """Wait up to ``within`` s for the connection to be up; whether it is."""
        self.start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._live.wait(), within)
        return self.listening

    def stop(self) -> None:
        """The host is stopping: wake every waiting claim, which then answers what it has (a
        server waits for open requests before it exits)."""
        self.stopping = True
        self._wake_all()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    @contextlib.contextmanager
    def waiter(self, wake_key: str) -> Iterator[asyncio.Event]:
        """An event set by the next wake-up for ``wake_key`` (a user id); register it *before*
        asking the database, so a ToDo that becomes ready in between is not missed."""
        event = asyncio.Event()
        self._waiting.setdefault(wake_key, set()).add(event)
        try:
            yield event
        finally:
            waiting = self._waiting.get(wake_key)
            if waiting is not None:
                waiting.discard(event)
                if not waiting:
                    del self._waiting[wake_key]

    def _wake(self, wake_key: str) -> None:
        for event in self._waiting.get(wake_key, ()):
            event.set()

    def _wake_all(self) -> None:
        # The connection dropped: notifications may have been lost, so every claim looks again.
        for events in self._waiting.values():
            for event in events:
                event.set()

    async def _run(self) -> None:
        import psycopg

        failures = 0
        while True:
            try:
                with store.translate():
                    conn = await psycopg.AsyncConnection.connect(
                        self.url, autocommit=True, connect_timeout=int(self.connect_timeout)
                    )
                try:
                    await conn.execute("listen cpa_desktop_ready")  # CHANNEL
                    self._live.set()
                    failures = 0
                    async for note in conn.notifies():
                        self._wake(user_of(note.payload))
                finally:
                    self._live.clear()
                    with contextlib.suppress(Exception):
                        await conn.close()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # psycopg's errors, translated or not: reconnect
                failures += 1
                log.warning("desktop wake-ups: LISTEN %s failed (%s); claims poll meanwhile",
                            CHANNEL, str(exc) or type(exc).__name__)  # fmt: skip
            self._wake_all()
            await asyncio.sleep(min(BACKOFF_MAX, 0.5 * 2 ** min(failures, 6)))
