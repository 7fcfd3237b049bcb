"""A lane: one claim loop of a dispatch pass, and the concurrency the lanes share.

Every claimed ToDo runs as an asyncio Task of its own (:meth:`_Lane._start`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from cpa_scheduler import claim, errors, executor, metrics, report, store

TodoRow = store.TodoRow
_Finished = report._Finished
Summary = report.Summary
log = logging.getLogger("cpa.dispatch")


@dataclass
class _Slots:
    """A pass's concurrency, shared by its lanes: ToDos running or waiting for their flush."""

    total: int
    held: int = 0
    # The last claim came back short of what it asked for: the ready pool is shallow (100
    # chains, say), and the lanes share what is in flight instead of one lane taking it all.
    shallow: bool = False
    freed: asyncio.Event = field(default_factory=asyncio.Event)

    def free(self) -> int:
        return self.total - self.held

    def release(self, count: int) -> None:
        self.held -= count
        if count > 0:
            self.freed.set()

    async def wait_freed(self, seconds: float | None) -> None:
        """Until another lane frees a slot (or ``seconds`` pass)."""
        self.freed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.freed.wait(), seconds)


@dataclass
class _Lane:
    """One claim loop of a pass and its state; each turn of the loop is a few named steps.

    A turn claims and starts ToDos while slots are free, starts a flush of the finished ones,
    and then waits for a ToDo, the flush or a wake-up, and collects what ended.
    """

    dispatcher: claim.Claimer
    slots: _Slots
    deadline: float
    stop: asyncio.Event | None
    wake: asyncio.Event | None
    traced: claim._PassTrace | None
    me: int
    busy: set[int]  # the pass's lanes that hold running ToDos
    summary: Summary = field(default_factory=Summary)
    running: dict[asyncio.Task[_Finished], TodoRow] = field(default_factory=dict)
    pending: list[_Finished] = field(default_factory=list)  # finished, waiting for a flush
    flushing: asyncio.Task[None] | None = None
    flush_batch: list[_Finished] = field(default_factory=list)
    need_claim: bool = True  # a claim must follow every flush: it may have released dependents
    paused_until: float = 0.0  # after a database fault: no claim or flush before this
    flush_next: bool = False  # the database refused a complete-and-claim: flush, one by one

    async def run(self) -> Summary:
        extender = asyncio.create_task(self.dispatcher._extend_leases(self.running))
        try:
            while await self._turn():
                pass
        finally:
            self.busy.discard(self.me)  # however the lane ends, the others must not wait on it
            self.slots.freed.set()  # a lane waiting in _idle for this one looks again
            extender.cancel()
            await self._await_flush()
        return self.summary

    async def _turn(self) -> bool:
        """One turn of the loop; False when the lane is done."""
        stopping = (self.stop is not None and self.stop.is_set()) or self._out_of_time()
        paused = time.monotonic() < self.paused_until
        if not stopping and not paused and (self.slots.free() > 0 or self._combinable()):
            await self._claim()
        if self.flushing is None and self.pending and not paused:
            if not stopping and self._combinable():
                return True  # the next turn's claim completes them in its transaction
            self._flush()
        if self.running:
            self.busy.add(self.me)
        else:
            self.busy.discard(self.me)
        if not self.running and not self.pending and self.flushing is None:
            return await self._idle(stopping)
        done = await self._wait(stopping, paused)
        if done is None:
            return True
        finished = self._collect(done, stopping)
        if not finished and self.running and self._out_of_time():
            await self._give_back()
            return False
        return True

    def _out_of_time(self) -> bool:
        return time.monotonic() >= self.deadline

    async def _claim(self) -> None:
        """Claim what the free slots allow and start it."""
        d = self.dispatcher
        if self.wake is not None:
            self.wake.clear()  # before the claim: a later NOTIFY wakes the wait
        self.busy.add(self.me)  # claiming counts as busy: an idle lane must not end the pass now
        claim_started = time.time_ns()
        done: list[_Finished] = []
        if self._combinable():  # finished ToDos are completed in the claim's transaction
            done, self.pending = self.pending, []
            self.slots.release(len(done))
        want = max(0, min(self.slots.free(), d.batch))
        if self.slots.shallow and d.lanes > 1:
            # A lane's share of the work in flight: the dependents this call releases beyond
            # it stay ready for another lane, so the lanes' rounds overlap.
            want = min(want, max(1, -(-(self.slots.held + len(done)) // d.lanes)))
        self.slots.held += want  # reserved before the await: the other lanes claim too
        before = len(self.pending)
        claimed: claim.Claimed = []
        delay: float | None = None
        stored = False
        try:
            claimed, delay, stored = await d._claim_guarded(want, self.pending, done, self.summary)
        finally:
            # handed-back ToDos wait in pending for the flush: they hold a slot
            self.slots.release(want - len(claimed) - (len(self.pending) - before))
            if done and not stored:  # still leased to us: stored by a later call
                self.pending[:0] = done
                self.slots.held += len(done)
                self.flush_next = delay is None  # refused as invalid: a flush sorts it out
        if delay is not None:
            self.paused_until = time.monotonic() + delay
            if not self.running and not self.pending and self.flushing is None:
                raise d.health.last_exc or errors.UnavailableError(
                    f"A claim failed: {d.health.last_error}"
                )
        self.need_claim = False
        self.slots.shallow = len(claimed) < want
        self.summary.claimed += len(claimed)
        metrics.observe_claim(row.error for row, _ in claimed)
        await self._start(claimed, claim_started)

    async def _start(self, claimed: claim.Claimed, claim_started: int) -> None:
        """A task per claimed ToDo, traced where its job (or the pass) is recorded."""
        d, traced = self.dispatcher, self.traced
        if not claimed:
            return
        if traced is None:
            for row, results in claimed:
                self.running[asyncio.create_task(d._run_one(row, results))] = row
            return
        parents = await d._trace_parents([r for r, _ in claimed], traced, claim_started)
        pass_recorded = traced.span.is_recording()
        for row, results in claimed:
            # A span per ToDo only where it is recorded: an unsampled job (or pass, for
            # untraced jobs) costs no span objects at all.
            parent = parents.get(str(row.job_id))
            record = parent is not None or pass_recorded
            task = asyncio.create_task(d._run_one(row, results, parent, record))
            self.running[task] = row

    def _combinable(self) -> bool:
        """Whether the next claim can complete ``pending`` in its transaction: no flush under
        way, and every outcome a plain Done (attachments, failures, timers and releases go
        through a flush)."""
        return (
            self.flushing is None
            and bool(self.pending)
            and not self.flush_next
            and all(type(f.outcome) is executor.Done for f in self.pending)
        )

    def _flush(self) -> None:
        """Commit the finished ToDos in the background while the next claim runs."""
        self.flush_next = False
        self.flush_batch, self.pending = self.pending, []
        self.flushing = asyncio.create_task(self.dispatcher._flush(self.flush_batch, self.summary))
        self.slots.release(len(self.flush_batch))

    async def _idle(self, stopping: bool) -> bool:
        """Nothing running or unflushed: end the lane, or wait for work; False to end."""
        if stopping or not self.need_claim:
            if stopping or not self.busy - {self.me}:
                return False
            if self.wake is None:
                # A pass without NOTIFY, while another lane runs ToDos: each of its
                # completions may release dependents, so claim again when it frees slots (or
                # ends) instead of ending and leaving a shallow pool to one lane.
                await self.slots.wait_freed(max(0.0, self.deadline - time.monotonic()))
                self.need_claim = True
                return True
            # Another lane still runs ToDos, so the pass goes on: stay ready for new work (a
            # NOTIFY, or a claim a second later) rather than leave it to a lane whose slots may
            # all be taken by one tenant's long ToDos.
            await _first_of(self.wake, self.stop, seconds=1.0)
            self.need_claim = True
        elif self.slots.free() <= 0:  # the other lanes hold every slot
            await self.slots.wait_freed(max(0.0, self.deadline - time.monotonic()))
        return True

    async def _wait(self, stopping: bool, paused: bool) -> set[asyncio.Future[Any]] | None:
        """Until a ToDo or the flush ends, a wake-up, the deadline or the pause's end.

        None when there was nothing to wait on but a fault's pause."""
        timeout = max(0.0, self.deadline - time.monotonic()) if not stopping else None
        if paused:
            wait_out = max(0.0, self.paused_until - time.monotonic())
            timeout = wait_out if timeout is None else min(timeout, wait_out)
        waiters: set[asyncio.Future[Any]] = set(self.running)
        if self.flushing is not None:
            waiters.add(self.flushing)
        woken: asyncio.Task[bool] | None = None
        if self.wake is not None and not stopping and not paused and self.slots.free() > 0:
            woken = asyncio.create_task(self.wake.wait())
            waiters.add(woken)
        if not waiters:  # only unflushed outcomes, waiting out a fault
            await asyncio.sleep(timeout or 0.0)
            return None
        done, _ = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if woken is not None:
            woken.cancel()
            done.discard(woken)
        return done

    def _collect(self, done: set[asyncio.Future[Any]], stopping: bool) -> int:
        """Settle an ended flush and move finished ToDos to pending; how many finished."""
        if self.flushing is not None and self.flushing in done:
            done.discard(self.flushing)
            self._settle_flush(self.flushing, stopping)
            self.flushing = None
            self.need_claim = True
        for task in done:
            self.running.pop(task)  # type: ignore[call-overload]
            if task.cancelled():  # stopped, no longer leased to us: nothing to report
                self.slots.release(1)
                continue
            self.pending.append(task.result())
        return len(done)

    def _settle_flush(self, flushing: asyncio.Task[None], stopping: bool) -> None:
        try:
            flushing.result()
        except Exception as exc:
            # Still leased to us: keep the outcomes and commit them after a pause. Stopping,
            # give up; the leases expire and nothing is lost.
            delay = self.dispatcher.health.fault("completion", exc)
            self.paused_until = time.monotonic() + delay
            if stopping:
                log.error("dispatcher: %d outcome(s) not stored while stopping; their leases "
                          "will expire and they run again", len(self.flush_batch))  # fmt: skip
            else:
                self.pending = self.flush_batch + self.pending
                self.slots.held += len(self.flush_batch)

    async def _give_back(self) -> None:
        """Out of time with work still running: give the leases back, store what finished."""
        d = self.dispatcher
        if self.flushing is not None:
            await self.flushing
            self.flushing = None
        await d._release(list(self.running.values()))
        for task in self.running:
            task.cancel()
        self.slots.release(len(self.running) + len(self.pending))
        self.running.clear()
        if self.pending:
            await d._flush(self.pending, self.summary)

    async def _await_flush(self) -> None:
        if self.flushing is not None:
            try:
                await self.flushing
            except Exception as exc:
                self.dispatcher.health.fault("completion", exc)


async def _first_of(wake: asyncio.Event, stop: asyncio.Event | None, *, seconds: float) -> None:
    waiters = [asyncio.create_task(wake.wait())]
    if stop is not None:
        waiters.append(asyncio.create_task(stop.wait()))
    await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    for waiter in waiters:
        waiter.cancel()
