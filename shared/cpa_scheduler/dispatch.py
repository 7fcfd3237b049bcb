"""The dispatch pass: claim ready cloud ToDos, run them concurrently, complete them in groups.

Ready-driven, not level-by-level: whenever capacity frees up the pass claims again, so a ToDo
released by a completion starts in the same pass and a job's makespan approaches its critical
path. Completions and failures that finish close together are committed in one transaction.
Leases are extended while a ToDo runs longer than half its lease. The pass acts on each
executor's typed outcome (:mod:`cpa_scheduler.executor`), never on an action's name: a
:class:`~cpa_scheduler.executor.Snooze` parks the ToDo with ``run_after`` (no worker is held,
which is how ``wait`` timers work), an :class:`~cpa_scheduler.executor.Attach` adds ToDos to
the job in the transaction that completes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import socket
import time
import types
import uuid
from collections import Counter
from collections.abc import Coroutine, Generator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from cpa_scheduler import bounds, errors, executor, graph, metrics, store, tracing

Session = store.Session
TodoRow = store.TodoRow  # by this name in the class, whose field ``store`` hides the module
log = logging.getLogger("cpa.dispatch")
# Seconds a LISTEN connection may stay quiet before the dispatcher asks it whether it lives.
LISTEN_CHECK = 5.0

# Finished jobs one retention batch deletes (cpa.retention_prune_v1: p_batch / 10, the store's
# default batch 5000); a full batch means more are waiting.
RETENTION_JOB_BATCH = 500


@dataclass
class Summary:
    """What one pass did."""

    claimed: int = 0
    done: int = 0
    failed: int = 0
    retried: int = 0
    timers: int = 0
    elapsed: float = 0.0

    def add(self, other: Summary) -> None:
        """Add another summary's counts to this one."""
        self.claimed += other.claimed
        self.done += other.done
        self.failed += other.failed
        self.retried += other.retried
        self.timers += other.timers

    def as_dict(self) -> dict[str, Any]:
        return {
            "claimed": self.claimed,
            "done": self.done,
            "failed": self.failed,
            "retried": self.retried,
            "timers": self.timers,
            "elapsed": round(self.elapsed, 3),
        }


@dataclass
class _PassTrace:
    """A traced pass: its span and, per job it touched, the parent of that job's ToDo spans."""

    span: tracing.Span
    jobs: dict[str, tracing.Context | None] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Release:
    """Not an executor's answer: the lease goes back untouched (the ToDo could not start)."""


@dataclass(frozen=True, slots=True)
class _Finished:
    """A claimed ToDo and how it ended, waiting for the flush that stores it."""

    row: TodoRow
    outcome: executor.Outcome | Release


Claimed = list[tuple[TodoRow, dict[str, dict[str, Any]]]]  # rows and their $ref results
# An outcome as it is stored: an Attach has become Done (attached) or Fail.
Settled = executor.Done | executor.Fail | executor.Snooze | Release


@dataclass
class Health:
    """A dispatcher's liveness: its last successful database round trip and its fault streak.

    ``serve``'s ``/readyz`` and the worker read it. A fault is logged with its cause and
    answers the pause before the next try: exponential from 0.25 s, capped at ``backoff_cap``.
    """

    backoff_cap: float = 2.0
    stale_after: float = 90.0
    started: float = field(default_factory=time.monotonic)
    last_ok: float | None = None
    last_beat: float = field(default_factory=time.monotonic)
    failures: int = 0  # consecutive
    failing_since: float | None = None
    last_error: str | None = None
    last_exc: BaseException | None = None
    running: bool = False

    def ok(self) -> None:
        now = time.monotonic()
        if self.failing_since is not None:
            log.warning("dispatcher: the database answers again after %.1f s",
                        now - self.failing_since)  # fmt: skip
        self.last_ok = self.last_beat = now
        self.failures, self.failing_since = 0, None

    def beat(self) -> None:
        self.last_beat = time.monotonic()

    def fault(self, where: str, exc: BaseException) -> float:
        now = time.monotonic()
        self.last_beat = now  # retrying is progress: the watchdog is for hangs, not outages
        self.failures += 1
        self.failing_since = self.failing_since or now
        cause = exc.message if isinstance(exc, errors.CpaError) else repr(exc)
        self.last_error, self.last_exc = f"{where}: {cause}", exc
        delay = min(self.backoff_cap, 0.25 * float(2 ** min(self.failures - 1, 16)))
        log.warning("dispatcher: %s failed (%d in a row), next try in %.2f s: %s",
                    where, self.failures, delay, cause)  # fmt: skip
        return delay

    def down_for(self) -> float:
        """Seconds since the current fault streak began (0 when healthy)."""
        return 0.0 if self.failing_since is None else time.monotonic() - self.failing_since

    @property
    def ready(self) -> bool:
        fresh = time.monotonic() - self.last_beat < self.stale_after
        return self.running and self.failures == 0 and self.last_ok is not None and fresh

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        if not self.running:
            status = "stopped"
        elif self.failures:
            status = "failing"
        elif self.last_ok is None:
            status = "starting"
        else:
            status = "ready" if self.ready else "stalled"
        return {
            "status": status,
            "last_ok_seconds_ago": None if self.last_ok is None else round(now - self.last_ok, 3),
            "failures": self.failures,
            "down_seconds": round(self.down_for(), 3),
            "last_error": self.last_error,
        }


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
class Dispatcher:
    """Runs dispatch passes against a store with a registry of cloud executors."""

    store: store.Store
    registry: executor.Registry = field(default_factory=executor.builtin)
    owner: str = field(default_factory=lambda: owner_name())
    # 256 / 128: with the lanes sharing the concurrency a claim can fill its batch, and bigger
    # batches mean fewer commits per ToDo. A 1 x 10,000 no-op drain beat 128 / 100 in 8 of 10
    # interleaved repeats; ratios of the medians x1.18 and x1.29 (tests/bench/RESULTS.md).
    concurrency: int = 256
    # Running cloud ToDos one tenant may hold (None: no cap); CPA_TENANT_RUNNING_CAP.
    tenant_cap: int | None = 64
    # Jobs one tenant's schedules may start per minute (CPA_SCHEDULE_JOBS_PER_MINUTE).
    schedule_budget: int = 60
    # Retention (CPA_RETENTION_DAYS, CPA_AUDIT_RETENTION_DAYS), pruned at most this often.
    retention_days: int = 30
    audit_retention_days: int = 365
    retention_every: float = 3600.0
    # Each sweep runs retention batches (one transaction each) while the jobs' batch comes back
    # full, for at most this long: an hourly batch of 500 jobs keeps up with 12,000 jobs a day,
    # a deployment of 100,000 jobs a day needs ~200 batches a day (docs/scale.md).
    retention_budget: float = 10.0
    _pruned_at: float | None = field(default=None, repr=False)
    batch: int = 128
    lanes: int = 2
    lease_seconds: float = 60.0
    backoff_base: float = 1.0
    alarm_interval: float = 1.0
    agent_seen_seconds: float = 120.0
    health: Health = field(default_factory=Health)

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
        slots = _Slots(self.concurrency)
        busy: set[int] = set()  # lanes that hold running ToDos
        with tracing.span("cpa.dispatch.pass", attributes={"cpa.dispatcher": self.owner}) as span:
            traced = None if span is None else _PassTrace(span)
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
        slots: _Slots,
        stop: asyncio.Event | None,
        wake: asyncio.Event | None,
        traced: _PassTrace | None = None,
        lanes: tuple[int, set[int]] = (0, set()),
    ) -> Summary:
        started = time.monotonic()
        me, busy = lanes
        lane = _Lane(self, slots, started + budget, stop, wake, traced, me, busy)
        summary = await lane.run()
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
                    await _sleep_unless(stop, delay)
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
            dead = dead_owners(await session.todo_lease_owners(prefix), self.owner)
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

    async def _claim(self, limit: int, done: Sequence[_Finished] = ()) -> tuple[int, list[TodoRow]]:
        """Claim up to ``limit``; with ``done`` (Done outcomes only), complete those first in
        the same transaction (one commit and one events flush for both). How many ToDos were
        completed, and the claimed rows."""
        items = [
            self._item(f.row) | {"result": cast(executor.Done, f.outcome).result} for f in done
        ]
        completed, rows = await self.store.claim(
            items, target="cloud", owner=self.owner, limit=limit,
            lease_seconds=self.lease_seconds, tenant_cap=self.tenant_cap,
        )  # fmt: skip
        self.health.ok()
        return completed, rows

    async def _claim_guarded(
        self,
        limit: int,
        pending: list[_Finished],
        done: Sequence[_Finished] = (),
        summary: Summary | None = None,
    ) -> tuple[Claimed, float | None, bool]:
        """Claim (completing ``done`` in the same transaction, counted in ``summary``), and
        read the dependency results the claimed ToDos refer to.

        A fault answers no rows and the pause to wait before the next try (none when the
        database refused ``done`` as invalid: a flush stores it, one by one if need be); the
        last item tells whether ``done`` was stored. ToDos claimed whose results could not be
        read are handed back (release outcomes in ``pending``).
        """
        try:
            completed, rows = await self._claim(limit, done)
        except Exception as exc:
            if done and isinstance(exc, errors.InvalidError):
                return [], None, False
            return [], self.health.fault("claim", exc), False
        if done:
            if summary is not None:
                summary.done += completed
            for action, count in Counter(f.row.action for f in done).items():
                metrics.observe_finished(action, "done", count)
        try:
            results = await self._results_for(rows)
        except Exception as exc:
            pending.extend(_Finished(row, Release()) for row in rows)
            return [], self.health.fault("dependency results", exc), True
        return [(row, results) for row in rows], None, True

    async def _results_for(self, rows: list[TodoRow]) -> dict[str, dict[str, Any]]:
        jobs = {str(r.job_id) for r in rows if any(graph.iter_refs(r.params))}
        if not jobs:
            return {}
        out: dict[str, dict[str, Any]] = {}
        async with self.store.service() as session:
            for job_id in jobs:
                out[job_id] = await session.todo_job_results(job_id)
        return out

    async def _trace_parents(
        self, rows: list[TodoRow], traced: _PassTrace, claim_started: int
    ) -> dict[str, tracing.Context | None]:
        """Per traced job, once per pass, a span in the job's own trace linked to the pass.

        Its context parents the job's ToDo spans, so a job's trace shows every pass that
        touched it, however many processes and minutes apart. The pass asks the database
        only for jobs it has not seen yet."""
        new = sorted({str(r.job_id) for r in rows} - traced.jobs.keys())
        if new:
            async with self.store.service() as session:
                stored = await session.job_traces(new)
            for job_id in new:
                value = stored.get(job_id)
                span = None if value is None else tracing.start(
                    "cpa.dispatch.claim",
                    context=tracing.parent(value),
                    attributes={"cpa.job_id": job_id, "cpa.dispatcher": self.owner},
                    links=[traced.span],
                    start_time=claim_started,
                )  # fmt: skip
                traced.jobs[job_id] = None
                if span is not None:
                    if span.is_recording():  # asked before end(): an ended span never records
                        traced.jobs[job_id] = tracing.context_of(span)
                    span.end()
        return traced.jobs

    async def _run_one(
        self,
        row: TodoRow,
        results: dict[str, dict[str, Any]],
        parent: tracing.Context | None = None,
        traced: bool = False,
    ) -> _Finished:
        began = time.perf_counter()
        if traced:
            # Few attributes: each costs per span; the job is the parent claim span's.
            attributes = {"cpa.todo_id": str(row.id), "cpa.todo_key": row.key,
                          "cpa.attempt": row.attempts}  # fmt: skip
            with tracing.span(f"cpa.todo.run {row.action}", context=parent,
                              attributes=attributes) as span:  # fmt: skip
                outcome = await self._execute(row, results)
                if isinstance(outcome, executor.Fail):
                    tracing.record_error(span, outcome.error)
        else:
            outcome = await self._execute(row, results)
        metrics.observe_run(row.action, time.perf_counter() - began)
        return _Finished(row, outcome)

    async def _execute(self, row: TodoRow, results: dict[str, dict[str, Any]]) -> executor.Outcome:
        """The executor's outcome; whatever it raises becomes a :class:`executor.Fail`."""
        try:
            found = results.get(str(row.job_id), {}) if results else {}
            params = graph.resolve_refs(row.params, found, row.key)
            run = self.registry.get(row.action)
            return _storable(row, await run(params, self._context(row)))
        except (errors.RetryableError, errors.UnavailableError) as exc:
            return executor.Fail(exc.message, retryable=True)
        except errors.CpaError as exc:
            return executor.Fail(exc.message)
        except Exception as exc:  # an executor bug must not take the pass down
            return executor.Fail(f"The executor for {row.action!r} crashed: {exc!r}")

    def _context(self, row: TodoRow) -> executor.Context:
        async def emit(kind: str, data: dict[str, Any]) -> None:
            async with self.store.service() as session:
                await session.event_append(
                    tenant_id=row.tenant_id, job_id=row.job_id, todo_id=row.id,
                    kind=kind, data=data,
                )  # fmt: skip

        return executor.Context(
            job_id=str(row.job_id),
            todo_id=str(row.id),
            key=row.key,
            tenant_id=str(row.tenant_id),
            attempt=row.attempts,
            emit=emit,
            timer_until=row.timer_until,
        )

    async def _flush(self, finished: list[_Finished], summary: Summary) -> None:
        try:
            await self._flush_batch(finished, summary)
        except errors.InvalidError as exc:
            # Something in the batch cannot be stored (a value the checks missed): commit the
            # outcomes one by one, so only the offending ToDo fails.
            log.warning("dispatcher: a completion batch of %d was refused (%s); storing "
                        "each ToDo alone", len(finished), exc.message)  # fmt: skip
            # Results first, failures last: a ToDo failing for good ends its job, and with it
            # the job's ToDos still running, whose results this batch may hold.
            refused: list[tuple[_Finished, str]] = []
            for f in sorted(finished, key=lambda f: isinstance(f.outcome, executor.Fail)):
                try:
                    await self._flush_batch([f], summary)
                except errors.InvalidError as alone:
                    refused.append((f, alone.message))
            for f, why in refused:
                error = f"The outcome of {f.row.action!r} cannot be stored: {why}"
                await self._flush_batch([_Finished(f.row, executor.Fail(error))], summary)
        self.health.ok()

    async def _flush_batch(self, finished: list[_Finished], summary: Summary) -> None:
        # A failure may end its job, and a job ends with every ToDo final: its running ones
        # are cancelled (migration 20261207002100_terminal_event_last). The results this batch
        # has for such a job are stored first, in a transaction of their own, so they count.
        failing = {f.row.job_id for f in finished if isinstance(f.outcome, executor.Fail)}
        first = [
            f for f in finished
            if isinstance(f.outcome, executor.Done) and f.row.job_id in failing
        ]  # fmt: skip
        if first and len(first) < len(finished):
            await self._flush_together(first, summary)
            taken = {id(f) for f in first}
            finished = [f for f in finished if id(f) not in taken]
        await self._flush_together(finished, summary)

    async def _flush_together(self, finished: list[_Finished], summary: Summary) -> None:
        counted = Summary()  # added to the pass's summary only once the transaction commits
        async with self.store.service() as session:
            exclusive, shared = _gates(finished)
            if len(exclusive | shared) > 1 or exclusive & shared:
                # The lock order (migration 20261128000600_job_gate): every gate before any
                # row. Each operation below takes its own, but a later one would take them
                # after an earlier one's rows, or upgrade a shared gate: all of them first.
                await session.job_gate(exclusive, shared)
            settled: list[tuple[TodoRow, Settled]] = []
            for f in finished:
                if isinstance(f.outcome, executor.Attach):
                    settled.append((f.row, await self._attach(session, f.row, f.outcome)))
                else:
                    settled.append((f.row, f.outcome))
            await self._commit(session, settled, counted)
        summary.add(counted)

    async def _attach(
        self, session: Session, row: TodoRow, attach: executor.Attach
    ) -> executor.Done | executor.Fail:
        """Attach the ToDos in the transaction that completes ``row``: then it is done, or it
        fails when they cannot be attached."""
        try:
            async with session.conn.transaction():  # a savepoint: a bad plan fails alone
                await session.job_attach(row.job_id, attach.todos)
        except errors.CpaError as exc:
            return executor.Fail(f"The plan could not be attached: {exc.message}")
        return executor.Done(attach.result)

    async def _commit(
        self, session: Session, settled: list[tuple[TodoRow, Settled]], summary: Summary
    ) -> None:
        done: list[tuple[TodoRow, executor.Done]] = []
        failed: list[tuple[TodoRow, executor.Fail]] = []
        timers: list[tuple[TodoRow, executor.Snooze]] = []
        released: list[TodoRow] = []
        for row, outcome in settled:
            match outcome:
                case executor.Done():
                    done.append((row, outcome))
                case executor.Fail():
                    failed.append((row, outcome))
                case executor.Snooze():
                    timers.append((row, outcome))
                case Release():
                    released.append(row)
        # Exclusive operations before the completions (migration 20261128000600_job_gate): a
        # completion locks its jobs' rows, and a failure after it would wait for ToDos while
        # holding them, which another lane's complete-and-claim may hold while it waits for
        # those rows.
        if released:
            await session.todo_release([self._item(row) for row in released])
        if failed:
            await self._fail(session, failed, summary)
        if done:
            summary.done += await session.todo_complete(
                [self._item(row) | {"result": o.result} for row, o in done]
            )
        if done:
            actions = Counter(row.action for row, _ in done)
            for action, count in actions.items():
                metrics.observe_finished(action, "done", count)
        # In ToDo id order: the lock order (lease extension locks a job's ToDos by id too).
        for row, snooze in sorted(timers, key=lambda timer: timer[0].id):
            await session.todo_snooze(row.id, self.owner, snooze.until)
            summary.timers += 1

    async def _fail(
        self, session: Session, failed: list[tuple[TodoRow, executor.Fail]], summary: Summary
    ) -> None:
        items = [
            self._item(row) | {"error": _clean(o.error), "retryable": o.retryable}
            for row, o in failed
        ]
        await session.todo_fail(items, backoff_base=self.backoff_base)
        for row, o in failed:
            again = o.retryable and row.failed_attempts < row.max_attempts
            if again:
                summary.retried += 1
            else:
                summary.failed += 1
            metrics.observe_finished(row.action, "retry" if again else "failed")
            log.warning(
                "ToDo %r (%s) failed on attempt %s of %s%s: %s",
                row.key, row.action, row.failed_attempts, row.max_attempts,
                "; it will be retried" if again else "", o.error,
                extra={"tenant_id": str(row.tenant_id), "job_id": str(row.job_id),
                       "todo_id": str(row.id), "action": row.action, "retry": again},
            )  # fmt: skip

    def _item(self, row: TodoRow) -> dict[str, Any]:
        return {"id": str(row.id), "owner": self.owner, "attempt": row.attempts}

    async def _release(self, rows: list[TodoRow]) -> None:
        if rows:
            async with self.store.service() as session:
                await session.todo_release([self._item(r) for r in rows])

    async def _extend_leases(self, running: dict[asyncio.Task[_Finished], TodoRow]) -> None:
        """Extend the leases of the ToDos that run past half their lease, every quarter lease.

        ``running`` is the lane's own map: an extended row is replaced there by a copy with
        the new expiry, never changed in place."""
        half = self.lease_seconds / 2
        while True:
            await asyncio.sleep(half / 2)
            now = datetime.now(UTC)
            long = {
                r.id
                for r in running.values()
                if r.lease_expires_at is not None
                and r.lease_expires_at - now < timedelta(seconds=half)
            }
            self.health.beat()
            if long:
                try:
                    async with self.store.service() as session:
                        await session.todo_extend(list(long), self.owner, self.lease_seconds)
                except Exception as exc:
                    self.health.fault("lease extension", exc)
                    continue
                new_expiry = now + timedelta(seconds=self.lease_seconds)
                for task, r in list(running.items()):
                    if r.id in long:
                        running[task] = replace(r, lease_expires_at=new_expiry)


@dataclass
class _Lane:
    """One claim loop of a pass and its state; each turn of the loop is a few named steps.

    A turn claims and starts ToDos while slots are free, starts a flush of the finished ones,
    and then waits for a ToDo, the flush or a wake-up, and collects what ended.
    """

    dispatcher: Dispatcher
    slots: _Slots
    deadline: float
    stop: asyncio.Event | None
    wake: asyncio.Event | None
    traced: _PassTrace | None
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
        claimed: Claimed = []
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

    async def _start(self, claimed: Claimed, claim_started: int) -> None:
        """A task per claimed ToDo, traced where its job (or the pass) is recorded."""
        d, traced = self.dispatcher, self.traced
        if not claimed:
            return
        eager = d.registry.eager
        if traced is None:
            for row, results in claimed:
                if eager(row.action):
                    self._run_eagerly(row, d._run_one(row, results))
                else:
                    self.running[asyncio.create_task(d._run_one(row, results))] = row
            return
        parents = await d._trace_parents([r for r, _ in claimed], traced, claim_started)
        pass_recorded = traced.span.is_recording()
        for row, results in claimed:
            # A span per ToDo only where it is recorded: an unsampled job (or pass, for
            # untraced jobs) costs no span objects at all.
            parent = parents.get(str(row.job_id))
            record = parent is not None or pass_recorded
            if record or not eager(row.action):
                task = asyncio.create_task(d._run_one(row, results, parent, record))
                self.running[task] = row
            else:
                self._run_eagerly(row, d._run_one(row, results))

    def _run_eagerly(self, row: TodoRow, run: Coroutine[Any, Any, _Finished]) -> None:
        """Run a ToDo's first step now; a Task only for one that has to wait.

        For executors registered ``eager``: one that answers without awaiting anything
        (``noop``, ``wait``'s snooze) costs no Task, no scheduling round and no ``asyncio.wait``
        entry: its outcome goes straight to ``pending``. The step runs in a copy of the
        context, as a Task's would, and a ToDo that suspends goes on as a Task in that copy.
        """
        context = contextvars.copy_context()
        try:
            waiting = context.run(run.send, None)
        except StopIteration as stop:
            self.pending.append(stop.value)
            return
        task = asyncio.create_task(_continue(run, waiting), context=context)
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


def _storable(row: TodoRow, outcome: executor.Outcome) -> executor.Outcome:
    """The outcome with a result the database can store, or a Fail that says why not."""
    if isinstance(outcome, executor.Snooze | executor.Fail):
        return outcome
    if not isinstance(outcome, executor.Done | executor.Attach):  # an untyped executor
        return executor.Fail(
            f"The executor for {row.action!r} answered {type(outcome).__name__}, not an "
            "outcome (Done, Snooze, Attach or Fail)."
        )
    result = _jsonable(outcome.result)
    if not result and (result is None or isinstance(result, dict)):
        return outcome  # null or {}: nothing to check (noop's answer to no params)
    bad = bounds.problem(result, max_bytes=bounds.MAX_RESULT_BYTES)
    if bad is not None:
        return executor.Fail(f"The result of {row.action!r} cannot be stored: {bad}.")
    return outcome if result is outcome.result else replace(outcome, result=result)


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool | list | dict):
        return value
    return str(value)


def _clean(text: str) -> str:
    """Error text Postgres can store: no NUL, no unpaired surrogates, at most 4000 characters."""
    text = text.replace("\x00", "")
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text[:4000]


@types.coroutine
def _resume(run: Coroutine[Any, Any, _Finished], waiting: Any) -> Generator[Any, Any, _Finished]:
    """Drive ``run`` on from the point where it first suspended, waiting on ``waiting``.

    What ``await`` would do from there: values and exceptions the event loop sends in (a
    future's wake-up, a cancellation) go to ``run``; its return value is the result."""
    try:
        while True:
            try:
                sent = yield waiting
            except BaseException as exc:  # a cancellation, thrown into the ToDo
                waiting = run.throw(exc)
            else:
                waiting = run.send(sent)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


async def _continue(run: Coroutine[Any, Any, _Finished], waiting: Any) -> _Finished:
    return await _resume(run, waiting)


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


async def _first_of(wake: asyncio.Event, stop: asyncio.Event | None, *, seconds: float) -> None:
    waiters = [asyncio.create_task(wake.wait())]
    if stop is not None:
        waiters.append(asyncio.create_task(stop.wait()))
    await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    for waiter in waiters:
        waiter.cancel()


def owner_name() -> str:
    """A lease owner naming this host and process, so a successor can prove it dead."""
    return f"dispatcher:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def dead_owners(owners: list[str], me: str) -> list[str]:
    """The dispatcher owners on this host whose process is provably gone.

    Provably: the pid no longer exists, or it is this very process under an older name (a
    restarted container reuses its pid). Any other live pid might be the owner: it is left to
    its lease.
    """
    _, host, pid, _ = me.split(":", 3)
    dead = []
    for owner in owners:
        parts = owner.split(":")
        if len(parts) != 4 or parts[0] != "dispatcher" or parts[1] != host or owner == me:
            continue
        try:
            other = int(parts[2])
        except ValueError:
            continue
        if other == int(pid):
            dead.append(owner)
            continue
        try:
            os.kill(other, 0)
        except ProcessLookupError:
            dead.append(owner)
        except PermissionError:
            pass  # it exists (another user's process)
    return dead


def _gates(finished: Sequence[_Finished]) -> tuple[set[str], set[str]]:
    """The jobs a report gates exclusively (failing, releasing or attaching: those operations
    wait for ToDos while holding the job) and those it completes or snoozes in (shared); a
    job can be in both."""
    exclusive: set[str] = set()
    shared: set[str] = set()
    for f in finished:
        strong = isinstance(f.outcome, executor.Fail | executor.Attach | Release)
        (exclusive if strong else shared).add(str(f.row.job_id))
    return exclusive, shared
