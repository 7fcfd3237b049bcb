"""The dispatch pass: claim ready cloud ToDos, run them concurrently, complete them in groups.

Ready-driven, not level-by-level: whenever capacity frees up the pass claims again, so a ToDo
released by a completion starts in the same pass and a job's makespan approaches its critical
path. Completions and failures that finish close together are committed in one transaction.
Leases are extended while a ToDo runs longer than half its lease. ``wait`` ToDos are timers:
the first claim parks them with ``run_after`` (no worker is held), the claim after the timer
completes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from cpa_scheduler import bounds, errors, executor, graph, metrics, store, tracing

Session = store.Session
log = logging.getLogger("cpa.dispatch")

NO_LLM = (
    "No LLM provider is configured, so {action!r} cannot run; "
    "set OPENAI_API_KEY or OPENAI_BASE_URL."
)


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


@dataclass
class _Outcome:
    row: dict[str, Any]
    result: Any = None
    error: str | None = None
    retryable: bool = False
    snooze_until: datetime | None = None
    release: bool = False  # give the lease back untouched (it could not be started)


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
    # Retention (CPA_RETENTION_DAYS, CPA_AUDIT_RETENTION_DAYS), pruned at most this often.
    retention_days: int = 30
    audit_retention_days: int = 365
    retention_every: float = 3600.0
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
        deadline = started + budget
        me, busy = lanes
        summary = Summary()
        running: dict[asyncio.Task[_Outcome], dict[str, Any]] = {}
        pending: list[_Outcome] = []  # finished, waiting for the next flush
        flushing: asyncio.Task[None] | None = None
        need_claim = True  # a claim must follow every flush: it may have released dependents
        paused_until = 0.0  # after a database fault: no claim or flush before this
        flush_batch: list[_Outcome] = []
        extender = asyncio.create_task(self._extend_leases(running))
        try:
            while True:
                stopping = (stop is not None and stop.is_set()) or time.monotonic() >= deadline
                paused = time.monotonic() < paused_until
                if not stopping and slots.free() > 0 and not paused:
                    if wake is not None:
                        wake.clear()  # before the claim: a later NOTIFY wakes the wait below
                    busy.add(me)  # claiming counts as busy: an idle lane must not end the pass now
                    claim_started = time.time_ns()
                    want = min(slots.free(), self.batch)
                    slots.held += want  # reserved before the await: the other lanes claim too
                    before = len(pending)
                    claimed: list[tuple[dict[str, Any], dict[str, dict[str, Any]]]] = []
                    delay: float | None = None
                    try:
                        claimed, delay = await self._claim_guarded(want, pending)
                    finally:
                        # handed-back ToDos wait in pending for the flush: they hold a slot
                        slots.release(want - len(claimed) - (len(pending) - before))
                    if delay is not None:
                        paused_until = time.monotonic() + delay
                        if not running and not pending and flushing is None:
                            raise self.health.last_exc or errors.UnavailableError(
                                f"A claim failed: {self.health.last_error}"
                            )
                    need_claim = False
                    summary.claimed += len(claimed)
                    rows = [row for row, _ in claimed]
                    metrics.observe_claim(rows)
                    parents: dict[str, tracing.Context | None] = {}
                    if rows and traced is not None:
                        parents = await self._trace_parents(rows, traced, claim_started)
                    for row, results in claimed:
                        # A span per ToDo only where it is recorded: an unsampled job (or pass,
                        # for untraced jobs) costs no span objects at all.
                        parent = parents.get(str(row["job_id"]))
                        record = parent is not None or (
                            traced is not None and traced.span.is_recording()
                        )
                        task = asyncio.create_task(self._run_one(row, results, parent, record))
                        running[task] = row
                if flushing is None and pending and not paused:
                    # Completions commit in the background while the next claim runs.
                    flush_batch = pending
                    flushing = asyncio.create_task(self._flush(flush_batch, summary))
                    slots.release(len(flush_batch))
                    pending = []
                if running:
                    busy.add(me)
                else:
                    busy.discard(me)
                if not running and not pending and flushing is None:
                    if stopping or not need_claim:
                        if stopping or wake is None or not busy - {me}:
                            break
                        # Another lane still runs ToDos, so the pass goes on: stay ready for
                        # new work (a NOTIFY, or a claim a second later) rather than leave it
                        # to a lane whose slots may all be taken by one tenant's long ToDos.
                        await _first_of(wake, stop, seconds=1.0)
                        need_claim = True
                    elif slots.free() <= 0:  # the other lanes hold every slot
                        await slots.wait_freed(max(0.0, deadline - time.monotonic()))
                    continue
                timeout = max(0.0, deadline - time.monotonic()) if not stopping else None
                if paused:
                    wait_out = max(0.0, paused_until - time.monotonic())
                    timeout = wait_out if timeout is None else min(timeout, wait_out)
                waiters: set[asyncio.Future[Any]] = set(running)
                if flushing is not None:
                    waiters.add(flushing)
                woken: asyncio.Task[bool] | None = None
                if wake is not None and not stopping and not paused and slots.free() > 0:
                    woken = asyncio.create_task(wake.wait())
                    waiters.add(woken)
                if not waiters:  # only unflushed outcomes, waiting out a fault
                    await asyncio.sleep(timeout or 0.0)
                    continue
                done, _ = await asyncio.wait(
                    waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if woken is not None:
                    woken.cancel()
                    done.discard(woken)
                if flushing is not None and flushing in done:
                    done.discard(flushing)
                    try:
                        flushing.result()
                    except Exception as exc:
                        # Still leased to us: keep the outcomes and commit them after a pause.
                        # Stopping, give up; the leases expire and nothing is lost.
                        paused_until = time.monotonic() + self.health.fault("completion", exc)
                        if stopping:
                            log.error("dispatcher: %d outcome(s) not stored while stopping; "
                                      "their leases will expire and they run again",
                                      len(flush_batch))  # fmt: skip
                        else:
                            pending = flush_batch + pending
                            slots.held += len(flush_batch)
                    flushing = None
                    need_claim = True
                for finished in done:
                    running.pop(finished)  # type: ignore[call-overload]
                    pending.append(finished.result())
                if not done and running and time.monotonic() >= deadline:
                    # Out of time with work still running: give the leases back.
                    if flushing is not None:
                        await flushing
                        flushing = None
                    await self._release(list(running.values()))
                    for task in running:
                        task.cancel()
                    slots.release(len(running) + len(pending))
                    running.clear()
                    if pending:
                        await self._flush(pending, summary)
                    break
        finally:
            busy.discard(me)  # however the lane ends, the others must not wait on it
            extender.cancel()
            if flushing is not None:
                try:
                    await flushing
                except Exception as exc:
                    self.health.fault("completion", exc)
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
        try:
            async with self.store.service() as session:
                pruned = await session.retention_prune(
                    job_days=self.retention_days, audit_days=self.audit_retention_days
                )
        except Exception as exc:
            self.health.fault("retention", exc)
            return None
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
        import psycopg

        with store.translate():
            conn = await psycopg.AsyncConnection.connect(
                listen_url, autocommit=True, connect_timeout=max(2, int(self.store.timeout))
            )
            await conn.execute("listen cpa_todo_ready")

        async def listen() -> None:
            async for _ in conn.notifies():
                wake.set()

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
            await schedules.fire_due(self.store)
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

    async def _claim(self, limit: int) -> list[dict[str, Any]]:
        async with self.store.service() as session:
            rows = await session.todo_claim(
                target="cloud", owner=self.owner, limit=limit, lease_seconds=self.lease_seconds,
                tenant_cap=self.tenant_cap,
            )  # fmt: skip
        self.health.ok()
        return rows

    async def _claim_guarded(
        self, limit: int, pending: list[_Outcome]
    ) -> tuple[list[tuple[dict[str, Any], dict[str, dict[str, Any]]]], float | None]:
        """Claim, and read the dependency results the claimed ToDos refer to.

        A fault answers no rows and the pause to wait before the next try. ToDos claimed
        whose results could not be read are handed back (release outcomes in ``pending``).
        """
        try:
            rows = await self._claim(limit)
        except Exception as exc:
            return [], self.health.fault("claim", exc)
        try:
            results = await self._results_for(rows)
        except Exception as exc:
            pending.extend(_Outcome(row, release=True) for row in rows)
            return [], self.health.fault("dependency results", exc)
        return [(row, results) for row in rows], None

    async def _results_for(self, rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        jobs = {str(r["job_id"]) for r in rows if any(graph.iter_refs(r["params"]))}
        if not jobs:
            return {}
        out: dict[str, dict[str, Any]] = {}
        async with self.store.service() as session:
            for job_id in jobs:
                out[job_id] = await session.todo_job_results(job_id)
        return out

    async def _trace_parents(
        self, rows: list[dict[str, Any]], traced: _PassTrace, claim_started: int
    ) -> dict[str, tracing.Context | None]:
        """Per traced job, once per pass, a span in the job's own trace linked to the pass.

        Its context parents the job's ToDo spans, so a job's trace shows every pass that
        touched it, however many processes and minutes apart. The pass asks the database
        only for jobs it has not seen yet."""
        new = sorted({str(r["job_id"]) for r in rows} - traced.jobs.keys())
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
        row: dict[str, Any],
        results: dict[str, dict[str, Any]],
        parent: tracing.Context | None = None,
        traced: bool = False,
    ) -> _Outcome:
        began = time.perf_counter()
        if traced:
            # Few attributes: each costs per span; the job is the parent claim span's.
            attributes = {"cpa.todo_id": str(row["id"]), "cpa.todo_key": row["key"],
                          "cpa.attempt": row["attempts"]}  # fmt: skip
            with tracing.span(f"cpa.todo.run {row['action']}", context=parent,
                              attributes=attributes) as span:  # fmt: skip
                outcome = await self._execute(row, results)
                if outcome.error is not None:
                    tracing.record_error(span, outcome.error)
        else:
            outcome = await self._execute(row, results)
        metrics.instruments().todo_run.labels(row["action"]).observe(time.perf_counter() - began)
        return outcome

    async def _execute(self, row: dict[str, Any], results: dict[str, dict[str, Any]]) -> _Outcome:
        key = row["key"]
        try:
            params = graph.resolve_refs(row["params"], results.get(str(row["job_id"]), {}), key)
            if row["action"] == "wait" and row["timer_until"] is None:
                seconds = params.get("seconds") if isinstance(params, dict) else None
                await executor.wait({"seconds": seconds}, self._context(row))
                assert isinstance(seconds, int | float)
                until = datetime.now(UTC) + timedelta(seconds=float(seconds))
                return _Outcome(row, snooze_until=until)
            if row["action"] in ("llm.generate", "plan") and row["action"] not in self.registry:
                raise errors.PermanentError(NO_LLM.format(action=row["action"]))
            run = self.registry.get(row["action"])
            result = _jsonable(await run(params, self._context(row)))
            bad = bounds.problem(result, max_bytes=bounds.MAX_RESULT_BYTES)
            if bad is not None:
                return _Outcome(
                    row, error=f"The result of {row['action']!r} cannot be stored: {bad}."
                )
            return _Outcome(row, result=result)
        except (errors.RetryableError, errors.UnavailableError) as exc:
            return _Outcome(row, error=exc.message, retryable=True)
        except errors.CpaError as exc:
            return _Outcome(row, error=exc.message)
        except Exception as exc:  # an executor bug must not take the pass down
            return _Outcome(row, error=f"The executor for {row['action']!r} crashed: {exc!r}")

    def _context(self, row: dict[str, Any]) -> executor.Context:
        async def emit(kind: str, data: dict[str, Any]) -> None:
            async with self.store.service() as session:
                await session.event_append(
                    tenant_id=row["tenant_id"], job_id=row["job_id"], todo_id=row["id"],
                    kind=kind, data=data,
                )  # fmt: skip

        return executor.Context(
            job_id=str(row["job_id"]),
            todo_id=str(row["id"]),
            key=row["key"],
            tenant_id=str(row["tenant_id"]),
            attempt=row["attempts"],
            emit=emit,
        )

    async def _flush(self, outcomes: list[_Outcome], summary: Summary) -> None:
        try:
            await self._flush_batch(outcomes, summary)
        except errors.InvalidError as exc:
            # Something in the batch cannot be stored (a value the checks missed): commit the
            # outcomes one by one, so only the offending ToDo fails.
            log.warning("dispatcher: a completion batch of %d was refused (%s); storing "
                        "each ToDo alone", len(outcomes), exc.message)  # fmt: skip
            for o in outcomes:
                await self._flush_one(o, summary)
        self.health.ok()

    async def _flush_batch(self, outcomes: list[_Outcome], summary: Summary) -> None:
        counted = Summary()  # added to the pass's summary only once the transaction commits
        async with self.store.service() as session:
            for o in outcomes:
                if o.error is None and o.row["action"] == "plan" and isinstance(o.result, dict):
                    await self._attach(session, o)
            await self._commit(session, outcomes, counted)
        summary.add(counted)

    async def _flush_one(self, o: _Outcome, summary: Summary) -> None:
        try:
            await self._flush_batch([o], summary)
        except errors.InvalidError as exc:
            failed = _Outcome(
                o.row, error=f"The outcome of {o.row['action']!r} cannot be stored: {exc.message}"
            )
            await self._flush_batch([failed], summary)

    async def _attach(self, session: Session, o: _Outcome) -> None:
        """Attach a planned sub-graph in the transaction that completes the plan ToDo."""
        assert isinstance(o.result, dict)
        try:
            async with session.conn.transaction():  # a savepoint: a bad plan fails alone
                await session.job_attach(o.row["job_id"], o.result.get("attach", []))
        except errors.CpaError as exc:
            o.error, o.retryable = f"The plan could not be attached: {exc.message}", False

    async def _commit(self, session: Session, outcomes: list[_Outcome], summary: Summary) -> None:
        released = [o for o in outcomes if o.release]
        outcomes = [o for o in outcomes if not o.release]
        done = [o for o in outcomes if o.error is None and o.snooze_until is None]
        failed = [o for o in outcomes if o.error is not None]
        if released:
            await session.todo_release([self._item(o.row) for o in released])
        timers = [o for o in outcomes if o.snooze_until is not None]
        if done:
            summary.done += await session.todo_complete(
                [self._item(o.row) | {"result": _jsonable(o.result)} for o in done]
            )
        if failed:
            items = [
                self._item(o.row) | {"error": _clean(o.error or ""), "retryable": o.retryable}
                for o in failed
            ]
            await session.todo_fail(items, backoff_base=self.backoff_base)
            for o in failed:
                again = o.retryable and o.row["attempts"] < o.row["max_attempts"]
                if again:
                    summary.retried += 1
                else:
                    summary.failed += 1
                metrics.observe_finished(o.row["action"], "retry" if again else "failed")
                log.warning(
                    "ToDo %r (%s) failed on attempt %s of %s%s: %s",
                    o.row["key"], o.row["action"], o.row["attempts"], o.row["max_attempts"],
                    "; it will be retried" if again else "", o.error,
                    extra={"tenant_id": str(o.row["tenant_id"]), "job_id": str(o.row["job_id"]),
                           "todo_id": str(o.row["id"]), "action": o.row["action"],
                           "retry": again},
                )  # fmt: skip
        for o in done:
            metrics.observe_finished(o.row["action"], "done")
        for o in timers:
            assert o.snooze_until is not None
            await session.todo_snooze(o.row["id"], self.owner, o.snooze_until)
            summary.timers += 1

    def _item(self, row: dict[str, Any]) -> dict[str, Any]:
        return {"id": str(row["id"]), "owner": self.owner, "attempt": row["attempts"]}

    async def _release(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            async with self.store.service() as session:
                await session.todo_release([self._item(r) for r in rows])

    async def _extend_leases(self, running: dict[asyncio.Task[_Outcome], dict[str, Any]]) -> None:
        half = self.lease_seconds / 2
        while True:
            await asyncio.sleep(half / 2)
            now = datetime.now(UTC)
            long = [
                r["id"]
                for r in running.values()
                if r["lease_expires_at"] is not None
                and r["lease_expires_at"] - now < timedelta(seconds=half)
            ]
            self.health.beat()
            if long:
                try:
                    async with self.store.service() as session:
                        await session.todo_extend(long, self.owner, self.lease_seconds)
                except Exception as exc:
                    self.health.fault("lease extension", exc)
                    continue
                new_expiry = now + timedelta(seconds=self.lease_seconds)
                for r in running.values():
                    if r["id"] in long:
                        r["lease_expires_at"] = new_expiry


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool | list | dict):
        return value
    return str(value)


def _clean(text: str) -> str:
    """Error text Postgres can store: no NUL, no unpaired surrogates, at most 4000 characters."""
    text = text.replace("\x00", "")
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text[:4000]


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
