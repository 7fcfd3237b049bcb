"""The report of a dispatch pass: what it did (:class:`Summary`), the outcomes of finished
ToDos, and the flush that stores them in groups, taking the jobs' gates in lock order."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from cpa_scheduler import bounds, errors, executor, health, metrics, store

Session = store.Session
TodoRow = store.TodoRow  # by this name in the class, whose field ``store`` hides the module
Health = health.Health  # by this name in the class, whose field ``health`` hides the module
log = logging.getLogger("cpa.dispatch")


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


@dataclass(frozen=True, slots=True)
class Release:
    """Not an executor's answer: the lease goes back untouched (the ToDo could not start)."""


@dataclass(frozen=True, slots=True)
class _Finished:
    """A claimed ToDo and how it ended, waiting for the flush that stores it."""

    row: TodoRow
    outcome: executor.Outcome | Release


# An outcome as it is stored: an Attach has become Done (attached) or Fail.
Settled = executor.Done | executor.Fail | executor.Snooze | Release


@dataclass
class Reporter:
    """A dispatcher's settings and its report: the flush that stores finished ToDos."""

    store: store.Store
    registry: executor.Registry = field(default_factory=executor.builtin)
    owner: str = field(default_factory=lambda: health.owner_name())
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
        """Every quarter lease: stop the executors of ToDos no longer leased to this dispatcher,
        and extend the leases of the ToDos that run past half their lease.

        A ToDo is no longer ours when its job was cancelled, or its lease expired and another
        worker took it: its result would be dropped, so its executor is cancelled instead of
        running on (an LLM call, a download, a second side effect). ``running`` is the lane's
        own map: an extended row is replaced there by a copy with the new expiry, never changed
        in place."""
        half = self.lease_seconds / 2
        while True:
            await asyncio.sleep(half / 2)
            self.health.beat()
            if not running:
                continue
            now = datetime.now(UTC)
            rows = list(running.values())
            long = {
                r.id
                for r in rows
                if r.lease_expires_at is not None
                and r.lease_expires_at - now < timedelta(seconds=half)
            }
            try:
                async with self.store.service() as session:
                    held = await session.todo_held([(r.id, r.attempts) for r in rows], self.owner)
                    if long & held:
                        await session.todo_extend(list(long & held), self.owner, self.lease_seconds)
            except Exception as exc:
                self.health.fault("lease extension", exc)
                continue
            new_expiry = now + timedelta(seconds=self.lease_seconds)
            asked = {r.id for r in rows}  # a task the lane started since is not in the answer
            for task, r in list(running.items()):
                if r.id in long and r.id in held:
                    running[task] = replace(r, lease_expires_at=new_expiry)
                elif r.id in asked and r.id not in held and task.cancel():
                    log.info(
                        "stopped the executor of ToDo %s (%s): it is no longer leased to this "
                        "dispatcher (its job was cancelled, or its lease was lost)",
                        r.id, r.action,
                        extra={"todo_id": str(r.id), "job_id": str(r.job_id),
                               "action": r.action},
                    )  # fmt: skip


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
