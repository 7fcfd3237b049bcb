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
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from cpa_scheduler import errors, executor, graph, metrics, store, tracing

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


def resolve_refs(params: Any, results: Mapping[str, Any], key: str) -> Any:
    """Replace every ``{"$ref": "dep.result.path"}`` with the value it names."""
    if graph.is_ref(params):
        ref = str(params[graph.REF_KEY])
        source, _, rest = ref.partition(".")
        if source not in results:
            raise errors.PermanentError(
                f"The ToDo {key!r} references {ref!r}, but {source!r} has no result; "
                "it must be a finished dependency."
            )
        value: Any = results[source]
        parts = rest.split(".") if rest else []
        if parts and parts[0] == "result":
            parts = parts[1:]
        for part in parts:
            if isinstance(value, Mapping) and part in value:
                value = value[part]
            elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
                value = value[int(part)]
            else:
                raise errors.PermanentError(
                    f"The ToDo {key!r} references {ref!r}, but the result of {source!r} "
                    f"has no {part!r}."
                )
        return value
    if isinstance(params, dict):
        return {k: resolve_refs(v, results, key) for k, v in params.items()}
    if isinstance(params, list):
        return [resolve_refs(v, results, key) for v in params]
    return params


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
    owner: str = field(default_factory=lambda: f"dispatcher:{uuid.uuid4().hex[:12]}")
    # 256 / 128: with the lanes sharing the concurrency a claim can fill its batch, and bigger
    # batches mean fewer commits per ToDo. A 1 x 10,000 no-op drain beat 128 / 100 in 8 of 10
    # interleaved repeats; ratios of the medians x1.18 and x1.29 (tests/bench/RESULTS.md).
    concurrency: int = 256
    batch: int = 128
    lanes: int = 2
    lease_seconds: float = 60.0
    backoff_base: float = 1.0
    alarm_interval: float = 1.0
    agent_seen_seconds: float = 120.0

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
        with tracing.span("cpa.dispatch.pass", attributes={"cpa.dispatcher": self.owner}) as span:
            traced = None if span is None else _PassTrace(span)
            try:
                parts = await asyncio.gather(
                    *(self._lane(budget, slots, stop, wake, traced) for _ in range(self.lanes))
                )
            except errors.CpaError:
                metrics.observe_pass(0, ok=False)
                raise  # a domain error (the database is down): the caller reports its message
            except Exception:
                metrics.observe_pass(0, ok=False)
                log.exception("The dispatch pass failed.", extra={"dispatcher": self.owner})
                raise
            total = Summary()
            for part in parts:
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
    ) -> Summary:
        started = time.monotonic()
        deadline = started + budget
        summary = Summary()
        running: dict[asyncio.Task[_Outcome], dict[str, Any]] = {}
        pending: list[_Outcome] = []  # finished, waiting for the next flush
        flushing: asyncio.Task[None] | None = None
        need_claim = True  # a claim must follow every flush: it may have released dependents
        extender = asyncio.create_task(self._extend_leases(running))
        try:
            while True:
                stopping = (stop is not None and stop.is_set()) or time.monotonic() >= deadline
                if not stopping and slots.free() > 0:
                    if wake is not None:
                        wake.clear()  # before the claim: a later NOTIFY wakes the wait below
                    claim_started = time.time_ns()
                    want = min(slots.free(), self.batch)
                    slots.held += want  # reserved before the await: the other lanes claim too
                    rows: list[dict[str, Any]] = []
                    try:
                        rows = await self._claim(want)
                    finally:
                        slots.release(want - len(rows))
                    need_claim = False
                    summary.claimed += len(rows)
                    metrics.observe_claim(rows)
                    results = await self._results_for(rows)
                    parents: dict[str, tracing.Context | None] = {}
                    if rows and traced is not None:
                        parents = await self._trace_parents(rows, traced, claim_started)
                    for row in rows:
                        # A span per ToDo only where it is recorded: an unsampled job (or pass,
                        # for untraced jobs) costs no span objects at all.
                        parent = parents.get(str(row["job_id"]))
                        record = parent is not None or (
                            traced is not None and traced.span.is_recording()
                        )
                        task = asyncio.create_task(self._run_one(row, results, parent, record))
                        running[task] = row
                if flushing is None and pending:
                    # Completions commit in the background while the next claim runs.
                    flushing = asyncio.create_task(self._flush(pending, summary))
                    slots.release(len(pending))
                    pending = []
                if not running and not pending and flushing is None:
                    if stopping or not need_claim:
                        break
                    if slots.free() <= 0:  # the other lanes hold every slot
                        await slots.wait_freed(max(0.0, deadline - time.monotonic()))
                    continue
                timeout = max(0.0, deadline - time.monotonic()) if not stopping else None
                waiters: set[asyncio.Future[Any]] = set(running)
                if flushing is not None:
                    waiters.add(flushing)
                woken: asyncio.Task[bool] | None = None
                if wake is not None and not stopping and slots.free() > 0:
                    woken = asyncio.create_task(wake.wait())
                    waiters.add(woken)
                done, _ = await asyncio.wait(
                    waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if woken is not None:
                    woken.cancel()
                    done.discard(woken)
                if flushing is not None and flushing in done:
                    done.discard(flushing)
                    flushing.result()
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
            extender.cancel()
            if flushing is not None:
                await flushing
        summary.elapsed = time.monotonic() - started
        return summary

    async def run_forever(
        self, listen_url: str, *, stop: asyncio.Event, sweep_interval: float = 1.0
    ) -> Summary:
        """Long-running mode: passes woken by ``NOTIFY cpa_todo_ready``, plus a periodic sweep
        for timers, backoff and expired leases. Returns when ``stop`` is set, after the ToDos it
        holds have finished."""
        total = Summary()
        wake = asyncio.Event()
        import psycopg

        conn = await psycopg.AsyncConnection.connect(listen_url, autocommit=True)
        await conn.execute("listen cpa_todo_ready")

        async def listen() -> None:
            async for _ in conn.notifies():
                wake.set()

        listener = asyncio.create_task(listen())
        alarm = asyncio.create_task(self._alarm(wake, stop))
        try:
            while not stop.is_set():
                wake.clear()
                total.add(await self.run_pass(3600.0, stop=stop, wake=wake, housekeeping=False))
                if stop.is_set():
                    break
                sleepers = [asyncio.create_task(wake.wait()), asyncio.create_task(stop.wait())]
                await asyncio.wait(
                    sleepers, timeout=sweep_interval, return_when=asyncio.FIRST_COMPLETED
                )
                for sleeper in sleepers:
                    sleeper.cancel()
        finally:
            listener.cancel()
            alarm.cancel()
            await conn.close()
        return total

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
            return await session.todo_claim(
                target="cloud", owner=self.owner, limit=limit, lease_seconds=self.lease_seconds
            )

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
        metrics.TODO_RUN.labels(row["action"]).observe(time.perf_counter() - began)
        return outcome

    async def _execute(self, row: dict[str, Any], results: dict[str, dict[str, Any]]) -> _Outcome:
        key = row["key"]
        try:
            params = resolve_refs(row["params"], results.get(str(row["job_id"]), {}), key)
            if row["action"] == "wait" and row["timer_until"] is None:
                seconds = params.get("seconds") if isinstance(params, dict) else None
                await executor.wait({"seconds": seconds}, self._context(row))
                assert isinstance(seconds, int | float)
                until = datetime.now(UTC) + timedelta(seconds=float(seconds))
                return _Outcome(row, snooze_until=until)
            if row["action"] in ("llm.generate", "plan") and row["action"] not in self.registry:
                raise errors.PermanentError(NO_LLM.format(action=row["action"]))
            run = self.registry.get(row["action"])
            result = await run(params, self._context(row))
            return _Outcome(row, result=result)
        except errors.RetryableError as exc:
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
        async with self.store.service() as session:
            for o in outcomes:
                if o.error is None and o.row["action"] == "plan" and isinstance(o.result, dict):
                    await self._attach(session, o)
            await self._commit(session, outcomes, summary)

    async def _attach(self, session: Session, o: _Outcome) -> None:
        """Attach a planned sub-graph in the transaction that completes the plan ToDo."""
        assert isinstance(o.result, dict)
        try:
            async with session.conn.transaction():  # a savepoint: a bad plan fails alone
                await session.job_attach(o.row["job_id"], o.result.get("attach", []))
        except errors.CpaError as exc:
            o.error, o.retryable = f"The plan could not be attached: {exc.message}", False

    async def _commit(self, session: Session, outcomes: list[_Outcome], summary: Summary) -> None:
        done = [o for o in outcomes if o.error is None and o.snooze_until is None]
        failed = [o for o in outcomes if o.error is not None]
        timers = [o for o in outcomes if o.snooze_until is not None]
        if done:
            summary.done += await session.todo_complete(
                [self._item(o.row) | {"result": _jsonable(o.result)} for o in done]
            )
        if failed:
            items = [
                self._item(o.row) | {"error": o.error, "retryable": o.retryable} for o in failed
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
            if long:
                async with self.store.service() as session:
                    await session.todo_extend(long, self.owner, self.lease_seconds)
                new_expiry = now + timedelta(seconds=self.lease_seconds)
                for r in running.values():
                    if r["id"] in long:
                        r["lease_expires_at"] = new_expiry


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool | list | dict):
        return value
    return str(value)
