"""Claiming and running ToDos: a claim (completing finished ToDos in its transaction), the
dependency results the claimed ToDos refer to, their trace parents, and each ToDo's run."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from cpa_scheduler import errors, executor, graph, metrics, report, store, tracing

TodoRow = store.TodoRow  # by this name in the class, whose field ``store`` hides the module
_Finished = report._Finished
Summary = report.Summary


@dataclass
class _PassTrace:
    """A traced pass: its span and, per job it touched, the parent of that job's ToDo spans."""

    span: tracing.Span
    jobs: dict[str, tracing.Context | None] = field(default_factory=dict)


Claimed = list[tuple[TodoRow, dict[str, dict[str, Any]]]]  # rows and their $ref results


@dataclass
class Claimer(report.Reporter):
    """A dispatcher's claims and runs, on top of its report."""

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
            pending.extend(_Finished(row, report.Release()) for row in rows)
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
            return report._storable(row, await run(params, self._context(row)))
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
