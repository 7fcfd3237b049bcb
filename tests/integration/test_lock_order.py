"""Lock order: a cancel (or a terminal failure) never deadlocks against a report transaction.

The dispatcher commits the outcomes of many ToDos (several jobs) in one transaction: it
completes some, then fails others. Before migration ``…_cancel_lock_order`` the completion
locked its jobs' rows at its end, and the failure that followed locked the job's unstarted
ToDos after that, while ``job_cancel_v1`` and ``todo_fail_terminal_v1`` locked the unstarted
ToDos first and the job row last: the reverse order, so the two waited on each other and
PostgreSQL aborted one with 40P01 (the API answered 503). Now every path locks the job rows
first (ascending id), then ToDos (ascending id). Each test drives the two transactions to the
interleaving that deadlocked, step by step, waiting until one really waits for a lock.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import psycopg
import pytest
from cpa_scheduler import errors, query, report, store

from tests.conftest import JobFactory, Member, MemberFactory

OWNER = "dispatcher:lock-order"


async def _ids(db_url: str, job_id: Any) -> dict[str, str]:
    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        cur = await conn.execute("select key, id from public.todos where job_id = %s", (job_id,))
        return {str(k): str(v) for k, v in await cur.fetchall()}


async def _lease(db_url: str, todo_ids: list[str], owner: str = OWNER) -> None:
    """What a claim does to these ToDos (and their job)."""
    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        await conn.execute(
            "update public.todos set status = 'running', lease_owner = %s, attempts = 1,"
            " lease_expires_at = now() + interval '5 minutes', started_at = now()"
            " where id = any(%s::uuid[])",
            (owner, todo_ids),
        )
        await conn.execute(
            "update public.jobs set status = 'running', started_at = now()"
            " where id in (select job_id from public.todos where id = any(%s::uuid[]))",
            (todo_ids,),
        )


async def _waits_for_a_lock(db_url: str, pid: int, seconds: float = 10.0) -> bool:
    """True once backend ``pid`` waits for a lock (a row lock shows as a transactionid wait)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as probe:
        while loop.time() < deadline:
            cur = await probe.execute(
                "select count(*) from pg_locks where pid = %s and not granted", (pid,)
            )
            row = await cur.fetchone()
            if row and row[0]:
                return True
            await asyncio.sleep(0.02)
    return False


async def _job(db_url: str, job_id: Any) -> tuple[str, dict[str, str]]:
    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        cur = await conn.execute("select status from public.jobs where id = %s", (job_id,))
        row = await cur.fetchone()
        assert row is not None
        cur = await conn.execute(
            "select key, status from public.todos where job_id = %s", (job_id,)
        )
        return str(row[0]), {str(k): str(v) for k, v in await cur.fetchall()}


def _item(todo_id: str, **kw: Any) -> dict[str, Any]:
    return {"id": todo_id, "owner": OWNER, "attempt": 1, **kw}


def _deadlocked(exc: BaseException | None) -> bool:
    return isinstance(exc, errors.UnavailableError) and "deadlock" in exc.message.lower()


async def test_cancel_against_a_report_that_completes_then_fails_in_one_transaction(
    db: store.Store, db_url: str, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    """R completes a1 (locking job J) and, in the same transaction, fails a2 for good, which
    cancels J's unstarted ToDo b; meanwhile the API cancels J. Old order: the cancel locked b,
    then waited for J's row (R's); R's failure then waited for b (the cancel's): 40P01."""
    m = await member_factory()
    job = await job_factory(
        m,
        [
            {"key": "a1", "action": "noop"},
            {"key": "a2", "action": "noop", "max_attempts": 1},
            {"key": "b", "action": "noop", "depends_on": ["a2"]},
        ],
    )
    ids = await _ids(db_url, job.id)
    await _lease(db_url, [ids["a1"], ids["a2"]])

    cancel_error: list[BaseException] = []
    cancel_pid: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    cancel_may_go = asyncio.Event()

    async def cancel() -> None:
        try:
            async with db.user(m.claims) as s:
                cancel_pid.set_result(s.conn.info.backend_pid)
                await cancel_may_go.wait()
                await s.job_get(job.id)  # as POST /v1/jobs/{id}/cancel does
                await s.job_cancel(job.id)
        except BaseException as exc:  # examined below
            cancel_error.append(exc)

    report_error: BaseException | None = None
    canceller = asyncio.create_task(cancel())
    try:
        async with db.service() as r:  # the dispatcher's report transaction (_commit)
            assert await r.todo_complete([_item(ids["a1"], result={})]) == 1
            cancel_may_go.set()
            # The cancel now waits for a lock R holds (J's row, or on the fixed schema J
            # itself before any ToDo); R goes on only once it does.
            pid = await asyncio.wait_for(cancel_pid, 10)
            assert await _waits_for_a_lock(db_url, pid), "the cancel never waited"
            await r.todo_fail([_item(ids["a2"], error="boom", retryable=False)])
    except errors.CpaError as exc:
        report_error = exc
    await asyncio.wait_for(canceller, 30)

    assert not _deadlocked(report_error), report_error
    assert not any(_deadlocked(e) for e in cancel_error), cancel_error
    assert report_error is None, report_error
    # The report committed first; the cancel then finds the job failed (a 409), or, had it
    # run first, cancelled it. Either way one consistent end, and no ToDo left open.
    assert all(isinstance(e, errors.ConflictError) for e in cancel_error), cancel_error
    status, todos = await _job(db_url, job.id)
    assert status in ("failed", "cancelled")
    assert todos["a1"] == "done" and todos["a2"] == "failed" and todos["b"] == "cancelled"


async def test_cancel_against_a_declined_confirmation(
    db: store.Store, db_url: str, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    """A declined confirmation fails its ToDo for good (todo_fail_terminal): it locked that
    ToDo first and then the job's other unstarted ToDos by id, while a cancel locks them all by
    id. With a lower id held by the cancel and the declined one by the confirmation: 40P01.

    A third transaction holds the lower ToDo so that the cancel queues for it before the
    confirmation does, which fixes who gets it when the holder commits."""
    m = await member_factory()
    job = await job_factory(
        m,
        [
            {"key": "x", "action": "noop", "requires_confirmation": True},
            {"key": "y", "action": "noop", "requires_confirmation": True},
            {"key": "z", "action": "noop", "depends_on": ["x", "y"]},
        ],
    )
    ids = await _ids(db_url, job.id)
    low, high = sorted([ids["x"], ids["y"]], key=uuid.UUID)  # uuid order is PostgreSQL's

    async with await psycopg.AsyncConnection.connect(db_url) as holder:
        await holder.execute("select 1 from public.todos where id = %s for no key update", (low,))
        results: dict[str, BaseException | None] = {}
        loop = asyncio.get_running_loop()
        pids: dict[str, asyncio.Future[int]] = {
            "cancel": loop.create_future(),
            "decline": loop.create_future(),
        }

        async def run(name: str, go: Any) -> None:
            try:
                async with db.user(m.claims) as s:
                    pids[name].set_result(s.conn.info.backend_pid)
                    await go(s)
                results[name] = None
            except BaseException as exc:  # examined below
                results[name] = exc

        async def do_cancel(s: store.Session) -> None:
            await s.job_cancel(job.id)

        async def do_decline(s: store.Session) -> None:
            await s.todo_confirm(high, approved=False)

        canceller = asyncio.create_task(run("cancel", do_cancel))
        assert await _waits_for_a_lock(db_url, await asyncio.wait_for(pids["cancel"], 10))
        decliner = asyncio.create_task(run("decline", do_decline))
        assert await _waits_for_a_lock(db_url, await asyncio.wait_for(pids["decline"], 10))
        await holder.commit()  # the cancel (first in the queue) goes on
        await asyncio.wait_for(asyncio.gather(canceller, decliner), 30)

    assert not any(_deadlocked(e) for e in results.values()), results
    # The cancel went first: the job is cancelled and the decline finds its ToDo cancelled.
    assert results["cancel"] is None, results
    assert isinstance(results["decline"], errors.ConflictError | type(None)), results
    status, todos = await _job(db_url, job.id)
    assert status == "cancelled"
    assert set(todos.values()) <= {"cancelled", "failed"}


@pytest.mark.parametrize("first", ["complete", "cancel"])
async def test_reports_over_many_jobs_and_cancels_settle_without_deadlock(
    db: store.Store,
    db_url: str,
    member_factory: MemberFactory,
    job_factory: JobFactory,
    first: str,
) -> None:
    """A short free-running mix: report transactions that each complete and fail ToDos of
    several jobs, and cancels of those jobs, all at once. No 40P01 anywhere."""
    m = await member_factory()
    jobs = []
    for _ in range(6):
        jobs.append(
            await job_factory(
                m,
                [
                    {"key": "a1", "action": "noop"},
                    {"key": "a2", "action": "noop", "max_attempts": 1},
                    {"key": "w", "action": "noop", "depends_on": ["a1"]},
                    {"key": "v", "action": "noop", "depends_on": ["a2"]},
                ],
            )
        )
    ids = [await _ids(db_url, j.id) for j in jobs]
    await _lease(db_url, [i[k] for i in ids for k in ("a1", "a2")])
    failures: list[BaseException] = []

    async def report(batch: list[dict[str, str]]) -> None:
        try:
            async with db.service() as r:
                await r.todo_complete([_item(i["a1"], result={}) for i in batch])
                await asyncio.sleep(0.05)
                await r.todo_fail([_item(i["a2"], error="x", retryable=False) for i in batch])
        except errors.CpaError as exc:
            failures.append(exc)

    async def cancel(job_id: Any) -> None:
        try:
            async with db.user(m.claims) as s:
                await s.job_cancel(job_id)
        except errors.ConflictError:
            pass  # the report failed it first
        except errors.CpaError as exc:
            failures.append(exc)

    order = [ids[0:3], ids[3:6]]
    tasks = [report(list(reversed(order[0]))), report(order[1])]
    cancels = [cancel(j.id) for j in reversed(jobs)]
    await asyncio.wait_for(
        asyncio.gather(*(tasks + cancels if first == "complete" else cancels + tasks)), 60
    )
    assert not failures, failures


async def test_two_dispatcher_reports_over_the_same_jobs_in_opposite_order(
    db: store.Store, db_url: str, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    """Two dispatchers' report transactions each complete a ToDo of one job and fail one of
    the other (J1 then J2, and J2 then J1). Each operation locks its own jobs first, so without
    the report locking all of its jobs at its start (cpa.job_lock_v1) the first operations
    take J1 and J2 and the second ones wait for each other: 40P01. A few rounds, since the two
    transactions run freely here."""
    from cpa_scheduler import dispatch, executor

    m = await member_factory()
    graph = [
        {"key": "d1", "action": "noop"},
        {"key": "d2", "action": "noop"},
        {"key": "f1", "action": "noop", "max_attempts": 1},
        {"key": "f2", "action": "noop", "max_attempts": 1},
    ]
    owners = ["dispatcher:one", "dispatcher:two"]
    failures: list[BaseException] = []
    for _ in range(4):
        one, two = await job_factory(m, graph), await job_factory(m, graph)
        ids = {one.id: await _ids(db_url, one.id), two.id: await _ids(db_url, two.id)}
        await _lease(db_url, [ids[one.id]["d1"], ids[two.id]["f1"]], owners[0])
        await _lease(db_url, [ids[two.id]["d2"], ids[one.id]["f2"]], owners[1])

        def row(job: store.JobRow, key: str, ids: dict[Any, dict[str, str]] = ids) -> store.TodoRow:
            return store.TodoRow(
                id=uuid.UUID(ids[job.id][key]), job_id=job.id, tenant_id=m.tenant_id, key=key,
                action="noop", params={}, attempts=1, max_attempts=1, timer_until=None,
                lease_expires_at=None, error=None,
            )  # fmt: skip

        batches = [
            [
                report._Finished(row(one, "d1"), executor.Done({})),
                report._Finished(row(two, "f1"), executor.Fail("boom")),
            ],
            [
                report._Finished(row(two, "d2"), executor.Done({})),
                report._Finished(row(one, "f2"), executor.Fail("boom")),
            ],
        ]

        async def flush(owner: str, batch: list[report._Finished]) -> None:
            try:
                await dispatch.Dispatcher(db, owner=owner)._flush_batch(batch, dispatch.Summary())
            except errors.CpaError as exc:
                failures.append(exc)

        await asyncio.wait_for(
            asyncio.gather(flush(owners[0], batches[0]), flush(owners[1], batches[1])), 30
        )
        assert not failures, failures
        for job in (one, two):
            status, _ = await _job(db_url, job.id)
            assert status == "failed"


async def test_a_cancel_chosen_to_break_a_deadlock_is_tried_again(
    db: store.Store, db_url: str, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    """The cycle the lock order cannot rule out: a transaction holds a ToDo it claimed (without
    its job, SKIP LOCKED) and then fails it with a plain todo_fail, which waits for the job; a
    cancel holding the job waits for that ToDo. The cancel waits first, so PostgreSQL picks it
    to abort (40P01). agent.claim no longer does this (it waits for the job only briefly: the
    test below), but the API's cancel still runs in a savepoint and is tried again, for any
    transaction that breaks the order: it answers 409 (the job failed), not 503."""
    m = await member_factory()
    job = await job_factory(m, [{"key": "a", "action": "noop", "max_attempts": 1}])
    ids = await _ids(db_url, job.id)
    pid: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    cancel_error: list[BaseException] = []

    async def cancel() -> None:
        try:
            async with db.user(m.claims) as s:
                pid.set_result(s.conn.info.backend_pid)
                await s.job_cancel(job.id)
        except BaseException as exc:  # examined below
            cancel_error.append(exc)

    async with db.service() as claim:
        await claim.conn.execute(  # the claim's update: the ToDo is the claim's now
            "update public.todos set status = 'running', lease_owner = %s, attempts = 1,"
            " lease_expires_at = now() + interval '5 minutes' where id = %s",
            (OWNER, ids["a"]),
        )
        canceller = asyncio.create_task(cancel())
        assert await _waits_for_a_lock(db_url, await asyncio.wait_for(pid, 10))
        await claim.todo_fail([_item(ids["a"], error="unresolvable $ref")])
    await asyncio.wait_for(canceller, 30)

    assert len(cancel_error) == 1 and isinstance(cancel_error[0], errors.ConflictError), (
        cancel_error
    )
    status, todos = await _job(db_url, job.id)
    assert status == "failed" and todos["a"] == "failed"


async def test_cancel_against_a_complete_and_claim(
    db: store.Store,
    db_url: str,
    member_factory: MemberFactory,
    job_factory: JobFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The dispatcher's complete-and-claim completes a1, whose dependent b a third transaction
    X holds; meanwhile the API cancels the job. todo_complete_claim_v1 locked the job row only
    after its ToDos: it held a1 and, once X let b go, waited for the job's row, which the cancel
    held while it waited for a1 (40P01). _v2 locks the job first, so the cancel waits there.
    One attempt: the API's retry on 40P01 would hide the deadlock."""
    monkeypatch.setattr(query, "DEADLOCK_ATTEMPTS", 1)
    m = await member_factory()
    job = await job_factory(
        m,
        [
            {"key": "a1", "action": "noop"},
            {"key": "b", "action": "noop", "depends_on": ["a1"]},
        ],
    )
    ids = await _ids(db_url, job.id)
    await _lease(db_url, [ids["a1"]])

    async with await psycopg.AsyncConnection.connect(db_url) as x:
        await x.execute("select 1 from public.todos where id = %s for update", (ids["b"],))
        cancel_error: list[BaseException] = []
        report_error: list[BaseException] = []

        async def report() -> None:
            try:
                async with db.service() as r:
                    pid.set_result(r.conn.info.backend_pid)
                    await r.todo_complete_claim(
                        [_item(ids["a1"], result={})], target="cloud", owner=OWNER, limit=10
                    )
            except BaseException as exc:  # examined below
                report_error.append(exc)

        async def cancel() -> None:
            try:
                async with db.user(m.claims) as s:
                    cancel_pid.set_result(s.conn.info.backend_pid)
                    await s.job_cancel(job.id)
            except BaseException as exc:  # examined below
                cancel_error.append(exc)

        loop = asyncio.get_running_loop()
        pid: asyncio.Future[int] = loop.create_future()
        cancel_pid: asyncio.Future[int] = loop.create_future()
        reporter = asyncio.create_task(report())
        assert await _waits_for_a_lock(db_url, await asyncio.wait_for(pid, 10)), "no wait on b"
        canceller = asyncio.create_task(cancel())
        assert await _waits_for_a_lock(db_url, await asyncio.wait_for(cancel_pid, 10))
        await x.rollback()  # X lets b go
        await asyncio.wait_for(asyncio.gather(reporter, canceller), 30)

    assert not any(_deadlocked(e) for e in report_error + cancel_error), (
        report_error,
        cancel_error,
    )
    assert report_error == [], report_error
    status, todos = await _job(db_url, job.id)
    # The report went first (it held the job): a1 done and b, released, claimed; the cancel
    # then ends the job and b, running, with it (a job ends with every ToDo final).
    assert cancel_error == [] and status == "cancelled", (cancel_error, status)
    assert todos == {"a1": "done", "b": "cancelled"}


async def _unresolvable_desktop_todo(
    db: store.Store, member: Member, job_factory: JobFactory
) -> tuple[store.JobRow, dict[str, str]]:
    """A running job whose desktop ToDo ``o`` is ready for an agent, with a ``$ref`` to a key
    its done dependency's result lacks: agent.claim claims ``o`` and then fails it."""
    from cpa_scheduler import dispatch

    job = await job_factory(
        member,
        [
            {"key": "n", "action": "noop", "target": "cloud", "params": {"x": 1}},
            {"key": "o", "action": "desktop.open_app", "target": "desktop", "depends_on": ["n"],
             "params": {"app": {"$ref": "n.result.app"}}},
        ],
    )  # fmt: skip
    await dispatch.Dispatcher(db).run_pass(5)  # n done: the job runs, o is ready
    status, todos = await _job(db.url, job.id)
    assert status == "running" and todos == {"n": "done", "o": "ready"}, (status, todos)
    return job, await _ids(db.url, job.id)


async def _lock_timeout(session: store.Session) -> str:
    cur = await session.conn.execute("show lock_timeout")
    row = await cur.fetchone()
    assert row is not None
    return str(row["lock_timeout"])


async def test_a_claim_that_fails_an_unresolvable_todo_gives_way_to_a_cancel(
    db: store.Store,
    db_url: str,
    member_factory: MemberFactory,
    job_factory: JobFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """agent.claim claims o (SKIP LOCKED, without its job); before it fails o for its
    unresolvable $ref, a cancel locks the job and waits for o. The claim's todo_fail then
    waits for the job while holding o: a cycle, and PostgreSQL aborted the cancel, the first
    to wait (40P01; the API's retry hid it). The claim now waits for the job at most a short
    lock_timeout (below deadlock_timeout), gives o up for this claim and commits, and the
    cancel goes on. One attempt: the API's retry on 40P01 would hide the deadlock."""
    from cpa_scheduler import agent

    monkeypatch.setattr(query, "DEADLOCK_ATTEMPTS", 1)
    m = await member_factory()
    job, ids = await _unresolvable_desktop_todo(db, m, job_factory)
    pid: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    cancel_error: list[BaseException] = []
    cancelled: list[store.JobRow] = []

    async def cancel() -> None:
        try:
            async with db.user(m.claims) as s:
                pid.set_result(s.conn.info.backend_pid)
                await s.job_get(job.id)  # as POST /v1/jobs/{id}/cancel does
                cancelled.append(await s.job_cancel(job.id))
        except BaseException as exc:  # examined below
            cancel_error.append(exc)

    tasks: list[asyncio.Task[None]] = []
    async with db.user(m.claims) as s:
        before = await _lock_timeout(s)
        results = s.todo_job_results

        async def results_once_the_cancel_waits(job_id: uuid.UUID | str) -> dict[str, Any]:
            # Between the claim and the failure: the claim holds o, the cancel takes the job.
            tasks.append(asyncio.create_task(cancel()))
            assert await _waits_for_a_lock(db_url, await asyncio.wait_for(pid, 10))
            return await results(job_id)

        monkeypatch.setattr(s, "todo_job_results", results_once_the_cancel_waits)
        with caplog.at_level("WARNING", logger="cpa.agent"):
            assigns = await agent.claim(s, tenant_id=m.tenant_id, agent_id="laptop", actions=None)
        assert await _lock_timeout(s) == before
    assert len(tasks) == 1
    await asyncio.wait_for(tasks[0], 30)

    assert not any(_deadlocked(e) for e in cancel_error), cancel_error
    assert cancel_error == [], cancel_error
    assert assigns == []
    assert [j.status for j in cancelled] == ["cancelled"]
    assert any(ids["o"] in r.getMessage() for r in caplog.records), caplog.records
    status, todos = await _job(db_url, job.id)
    # o, which the claim had leased, ended with the job (a job ends with every ToDo final,
    # migration 20261207002100_terminal_event_last); n's result is kept.
    assert status == "cancelled" and todos == {"n": "done", "o": "cancelled"}, (status, todos)
    async with db.user(m.claims) as s:
        assert await agent.claim(s, tenant_id=m.tenant_id, agent_id="laptop", actions=None) == []
    status, todos = await _job(db_url, job.id)
    assert status == "cancelled" and todos == {"n": "done", "o": "cancelled"}, (status, todos)


async def test_the_claims_lock_timeout_is_restored_after_a_failure_and_after_giving_up(
    db: store.Store,
    db_url: str,
    member_factory: MemberFactory,
    job_factory: JobFactory,
) -> None:
    """The short lock_timeout of agent.claim's todo_fail is the failure's alone: the rest of
    the request's transaction keeps the lock_timeout it had, whether the failure ran or gave
    up waiting for the job."""
    from cpa_scheduler import agent

    m = await member_factory()
    job, _ = await _unresolvable_desktop_todo(db, m, job_factory)
    async with db.user(m.claims) as s:
        await s.conn.execute("select set_config('lock_timeout', '7s', true)")
        assert await agent.claim(s, tenant_id=m.tenant_id, agent_id="laptop", actions=None) == []
        assert await _lock_timeout(s) == "7s"
    _, todos = await _job(db_url, job.id)
    assert todos["o"] == "failed"

    # Gave up: another transaction holds the job, so the failure times out.
    other, _ = await _unresolvable_desktop_todo(db, m, job_factory)
    async with await psycopg.AsyncConnection.connect(db_url) as holder:
        await holder.execute(
            "select 1 from public.jobs where id = %s for no key update", (other.id,)
        )
        async with db.user(m.claims) as s:
            await s.conn.execute("select set_config('lock_timeout', '7s', true)")
            assert (
                await agent.claim(s, tenant_id=m.tenant_id, agent_id="laptop", actions=None) == []
            )
            assert await _lock_timeout(s) == "7s"
            await s.conn.execute("select 1")  # the transaction is usable, and commits
        await holder.rollback()
    status, todos = await _job(db_url, other.id)
    assert status == "running" and todos["o"] == "running", (status, todos)
