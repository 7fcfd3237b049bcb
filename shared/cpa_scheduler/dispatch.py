"""The dispatch pass: claim ready cloud ToDos, run them concurrently, complete them in groups.

Ready-driven, not level-by-level: whenever capacity frees up the pass claims again, so a ToDo
released by a completion starts in the same pass and a job's makespan approaches its critical
path. Completions and failures that finish close together are committed in one transaction.
Leases are extended while a ToDo runs longer than half its lease, and the executor of a ToDo
no longer leased to the pass (its job cancelled, its lease lost) is stopped. The pass acts on each
executor's typed outcome (:mod:`cpa_scheduler.executor`), never on an action's name: a
:class:`~cpa_scheduler.executor.Snooze` parks the ToDo with ``run_after`` (no worker is held,
which is how ``wait`` timers work), an :class:`~cpa_scheduler.executor.Attach` adds ToDos to
the job in the transaction that completes it.

The parts: :mod:`cpa_scheduler.lane` (a pass's claim loops), :mod:`cpa_scheduler.claim` (claims
and runs), :mod:`cpa_scheduler.report` (the flush of finished ToDos) and
:mod:`cpa_scheduler.health` (supervision and owner liveness); :class:`Dispatcher` composes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from cpa_scheduler import claim, errors, health, lane, metrics, report, store, tracing

Health = health.Health  # by this name for the api's /readyz and the cli's watchdog
Summary = report.Summary
log = logging.getLogger("cpa.dispatch")
# Seconds a LISTEN connection may stay quiet before the dispatcher asks it whether it lives.
LISTEN_CHECK = 5.0

# Finished jobs one retention batch deletes (cpa.retention_prune_v1: p_batch / 10, the store's
# default batch 5000); a full batch means more are waiting.
RETENTION_JOB_BATCH = 500


@dataclass
class Dispatcher(claim.Claimer):
    """Runs dispatch passes against a store with a registry of cloud executors."""

    async def run_pass(
        self,
        budget: float,
        *,
        stop: asyncio.Event | None = None,
        wake: asyncio.Event | None = None,
        housekeeping: bool = True,
    ) -> Summary:
        """One pass: claim and run until no work is ready, the budget is spent or ``stop`` is set.

        ``wake`` (set by LISTEN/NOTIFY in long-running mode) makes a pass that is waiting on
        running ToDos claim again at once, so new work does not wait for a completion.
        The pass runs ``lanes`` claim loops side by side, sharing the concurrency: one loop
        leaves the database idle while it waits on its own round trips, and a lane claims
        whatever the others leave free, so a claim can fill its batch.
        """
        started = time.monotonic()
        if housekeeping:  # long-running mode does it on its own clock (see _alarm)
            await self._housekeeping()
        slots = lane._Slots(self.concurrency)
        busy: set[int] = set()  # lanes that hold running ToDos
        with tracing.span("cpa.dispatch.pass", attributes={"cpa.dispatcher": self.owner}) as span:
            traced = None if span is None else claim._PassTrace(span)
            try:
                parts = await asyncio.gather(
                    *(self._lane(budget, slots, stop, wake, traced, (i, busy))
                      for i in range(self.lanes)),
                    return_exceptions=True,  # a failing lane must not orphan the other one
                )  # fmt: skip
                failed = next((p for p in parts if isinstance(p, BaseException)), None)
                if failed is not None:
                    raise failed
            except errors.CpaError:
                metrics.observe_pass(0, ok=False)
                raise  # a domain error (the database is down): the caller reports its message
            except Exception:
                metrics.observe_pass(0, ok=False)
                log.exception("The dispatch pass failed.", extra={"dispatcher": self.owner})
                raise
            total = Summary()
            for part in parts:
                if isinstance(part, Summary):
                    total.add(part)
            total.elapsed = time.monotonic() - started
            if span is not None:
                span.set_attributes({f"cpa.{k}": v for k, v in total.as_dict().items()})
        metrics.observe_pass(total.claimed, ok=True)
        # Long-running mode sweeps every second: empty passes would drown the log at info.
        log.log(
            logging.INFO if total.claimed else logging.DEBUG,
            "dispatch pass: %s claimed, %s done, %s failed, %s retried, %s timers in %.3f s",
            total.claimed, total.done, total.failed, total.retried, total.timers, total.elapsed,
            extra={"dispatcher": self.owner, "summary": total.as_dict()},
        )  # fmt: skip
        return total

    async def _lane(
        self,
        budget: float,
        slots: lane._Slots,
        stop: asyncio.Event | None,
        wake: asyncio.Event | None,
        traced: claim._PassTrace | None = None,
        lanes: tuple[int, set[int]] = (0, set()),
    ) -> Summary:
        started = time.monotonic()
        me, busy = lanes
        loop = lane._Lane(self, slots, started + budget, stop, wake, traced, me, busy)
        summary = await loop.run()
        summary.elapsed = time.monotonic() - started
        return summary

    async def run_forever(
        self,
        listen_url: str,
        *,
        stop: asyncio.Event,
        sweep_interval: float = 1.0,
        max_down: float | None = None,
    ) -> Summary:
        """Long-running mode, supervised: a failing pass or a lost LISTEN connection is logged
        and retried with capped backoff; the loop never ends on an exception. Returns when
        ``stop`` is set, after the ToDos it holds have finished. With ``max_down``, a database
        unreachable for longer than that many seconds raises :class:`errors.UnavailableError`
        (a worker then exits non-zero and its supervisor restarts it)."""
        total = Summary()
        self.health.running = True
        try:
            while not stop.is_set():
                try:
                    await self.reclaim_dead()
                    await self._run_listening(listen_url, stop, sweep_interval, total)
                except Exception as exc:
                    delay = self.health.fault("dispatch pass", exc)
                    if max_down is not None and self.health.down_for() > max_down:
                        raise errors.UnavailableError(
                            f"The dispatcher could not reach the database for "
                            f"{self.health.down_for():.0f} s (limit {max_down:.0f} s); last "
                            f"error: {self.health.last_error}. Exiting so a supervisor restarts it."
                        ) from exc
                    await health._sleep_unless(stop, delay)
        finally:
            self.health.running = False
        return total

    async def maybe_prune(self) -> dict[str, int] | None:
        """Run one retention batch when the last one is ``retention_every`` seconds old."""
        now = time.monotonic()
        if self._pruned_at is not None and now - self._pruned_at < self.retention_every:
            return None
        self._pruned_at = now
        pruned: dict[str, int] = {}
        try:
            while True:
                async with self.store.service() as session:
                    batch = await session.retention_prune(
                        job_days=self.retention_days, audit_days=self.audit_retention_days
                    )
                for key, value in batch.items():
                    pruned[key] = pruned.get(key, 0) + int(value)
                full = batch.get("jobs", 0) >= RETENTION_JOB_BATCH
                if not full or time.monotonic() - now > self.retention_budget:
                    break
        except Exception as exc:
            self.health.fault("retention", exc)
            return pruned or None
        if any(pruned.values()):
            log.info("dispatcher: retention pruned %s", pruned)
        return pruned

    async def reclaim_dead(self) -> int:
        """Requeue now the ToDos leased to dispatchers of this host whose process is gone."""
        prefix = ":".join(self.owner.split(":")[:2]) + ":"
        if prefix.count(":") != 2:
            return 0
        async with self.store.service() as session:
            dead = health.dead_owners(await session.todo_lease_owners(prefix), self.owner)
            if not dead:
                return 0
            n = await session.todo_reclaim_dead(dead)
        log.warning("dispatcher: reclaimed %d ToDo(s) leased to %d dead dispatcher(s) on this "
                    "host: %s", n, len(dead), ", ".join(dead))  # fmt: skip
        return n

    async def _run_listening(
        self, listen_url: str, stop: asyncio.Event, sweep_interval: float, total: Summary
    ) -> None:
        """Passes woken by ``NOTIFY cpa_todo_ready``, plus a periodic sweep for timers, backoff
        and expired leases. Raises when a pass or the LISTEN connection fails."""
        wake = asyncio.Event()

        with store.translate():
            conn = await store.connection_class().connect(
                listen_url, autocommit=True, **store.connect_options(self.store.timeout)
            )
            await conn.execute("listen cpa_todo_ready")
        bounded = cast(Any, conn)

        async def listen() -> None:
            while True:
                async for _ in conn.notifies(timeout=LISTEN_CHECK):
                    wake.set()
                # A dead network (no reset) keeps a LISTEN connection quiet for good: ask it
                # now and then, so such a connection fails like a dropped one.
                bounded.deadline = self.store.timeout + store.DEADLINE_MARGIN
                try:
                    await conn.execute("select 1")
                finally:
                    bounded.deadline = None

        listener = asyncio.create_task(listen())
        alarm = asyncio.create_task(self._alarm(wake, stop))
        try:
            while not stop.is_set():
                if listener.done():  # the connection dropped: reconnect through the supervisor
                    with store.translate():
                        listener.result()
                    raise errors.UnavailableError("The LISTEN connection closed.")
                wake.clear()
                total.add(await self.run_pass(3600.0, stop=stop, wake=wake, housekeeping=False))
                if stop.is_set():
                    break
                await self.maybe_prune()
                sleepers = [asyncio.create_task(wake.wait()), asyncio.create_task(stop.wait())]
                await asyncio.wait(
                    sleepers, timeout=sweep_interval, return_when=asyncio.FIRST_COMPLETED
                )
                for sleeper in sleepers:
                    sleeper.cancel()
        finally:
            listener.cancel()
            alarm.cancel()
            with contextlib.suppress(Exception):
                await conn.close()

    async def _housekeeping(self) -> None:
        """Work each pass does before claiming: due schedule occurrences become jobs, and
        desktop ToDos no agent takes are announced (or fail at their agent timeout)."""
        from cpa_scheduler import schedules  # imports intake and times, only needed here

        try:
            await schedules.fire_due(self.store, budget=self.schedule_budget)
            async with self.store.service() as session:
                await session.desktop_sweep(self.agent_seen_seconds)
        except errors.UnavailableError:
            pass  # the claim that follows reports the outage
        except errors.CpaError as exc:
            # Housekeeping must not stop the claims (nor, in long-running mode, the alarm).
            log.warning("dispatch housekeeping failed: %s", exc.message)

    async def _alarm(self, wake: asyncio.Event, stop: asyncio.Event) -> None:
        """Fire due schedules, and set ``wake`` when the next timed ToDo or schedule is due.

        NOTIFY only fires when a ToDo becomes ready; one whose ``run_after`` lies ahead needs a
        clock. The next due time is re-read at least every ``alarm_interval`` seconds, so a new
        earlier timer is noticed within that bound too."""
        while not stop.is_set():
            await self._housekeeping()
            try:
                async with self.store.service() as session:
                    due = await session.todo_next_due("cloud")
            except errors.UnavailableError:
                due = None
            delay = self.alarm_interval
            if due is not None:
                delay = min(delay, max(0.0, (due - datetime.now(UTC)).total_seconds()))
            try:
                await asyncio.wait_for(stop.wait(), timeout=delay + 0.002)
            except TimeoutError:
                if due is not None and due <= datetime.now(UTC):
                    wake.set()
