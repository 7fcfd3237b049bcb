"""The per-job gate (migration ``…_job_gate``): completions of one job run side by side and
meet only at the job row, at their end; every other writer waits for them at the gate.

Each test holds one transaction open at a chosen point and looks at what a second one can do.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from cpa_scheduler import dispatch, executor, report, store

from tests.conftest import JobFactory, MemberFactory
from tests.integration.test_lock_order import OWNER, _ids, _item, _job, _lease, _waits_for_a_lock


async def _wait_kind(db_url: str, pid: int) -> str | None:
    """The kind of lock backend ``pid`` waits for (advisory, transactionid, tuple), if any."""
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as probe:
        cur = await probe.execute(
            "select locktype from pg_locks where pid = %s and not granted", (pid,)
        )
        row = await cur.fetchone()
        return None if row is None else str(row[0])


async def _row_is_locked(db_url: str, table: str, row_id: str) -> bool:
    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        query = {
            "todos": "select 1 from public.todos where id = %s for update skip locked",
            "jobs": "select 1 from public.jobs where id = %s for update skip locked",
        }[table]
        cur = await conn.execute(query, (row_id,))
        return await cur.fetchone() is None


async def test_two_completions_of_one_job_meet_only_at_the_job_row(
    db: store.Store, db_url: str, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    """A holds its completion of a1 open. B's completion of a2 (same job) gets through its
    ToDo and the dependent it releases, and waits only for the job row. Before the gate B
    waited for the job row first, holding nothing."""
    m = await member_factory()
    job = await job_factory(
        m,
        [
            {"key": "a1", "action": "noop"},
            {"key": "a2", "action": "noop"},
            {"key": "b", "action": "noop", "depends_on": ["a2"]},
        ],
    )
    ids = await _ids(db_url, job.id)
    await _lease(db_url, [ids["a1"], ids["a2"]])

    async with db.service() as a:
        assert await a.todo_complete([_item(ids["a1"], result={})]) == 1
        pid: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        async def b() -> int:
            async with db.service() as s:
                pid.set_result(s.conn.info.backend_pid)
                return await s.todo_complete([_item(ids["a2"], result={})])

        other = asyncio.create_task(b())
        b_pid = await asyncio.wait_for(pid, 10)
        assert await _waits_for_a_lock(db_url, b_pid)
        assert await _wait_kind(db_url, b_pid) in {"transactionid", "tuple"}
        # B holds its own ToDo and the dependent it released: it is past them.
        assert await _row_is_locked(db_url, "todos", ids["a2"])
        assert await _row_is_locked(db_url, "todos", ids["b"])
    assert await asyncio.wait_for(other, 10) == 1
    status, todos = await _job(db_url, job.id)
    assert status == "running" and todos == {"a1": "done", "a2": "done", "b": "ready"}


async def test_a_cancel_waits_at_the_gate_for_a_completion_then_cancels(
    db: store.Store, db_url: str, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    """A completion of a1 is open (shared gate). The API's cancel waits at the gate (an
    advisory lock), before any row, and ends the job once the completion commits."""
    m = await member_factory()
    job = await job_factory(
        m, [{"key": "a1", "action": "noop"}, {"key": "b", "action": "noop", "depends_on": ["a1"]}]
    )
    ids = await _ids(db_url, job.id)
    await _lease(db_url, [ids["a1"]])
    pid: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def cancel() -> str:
        async with db.user(m.claims) as s:
            pid.set_result(s.conn.info.backend_pid)
            return (await s.job_cancel(job.id)).status

    async with db.service() as a:
        assert await a.todo_complete([_item(ids["a1"], result={})]) == 1
        canceller = asyncio.create_task(cancel())
        cancel_pid = await asyncio.wait_for(pid, 10)
        assert await _waits_for_a_lock(db_url, cancel_pid)
        assert await _wait_kind(db_url, cancel_pid) == "advisory"
    assert await asyncio.wait_for(canceller, 10) == "cancelled"
    status, todos = await _job(db_url, job.id)
    assert status == "cancelled" and todos == {"a1": "done", "b": "cancelled"}


async def test_lease_expiry_skips_a_job_whose_gate_is_held(
    db: store.Store, db_url: str, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    """Every claim expires leases first; it must not wait for a job a completion holds. The
    expired lease of that job is requeued by the first claim after the completion commits."""
    m = await member_factory()
    job = await job_factory(m, [{"key": "a1", "action": "noop"}, {"key": "a2", "action": "noop"}])
    ids = await _ids(db_url, job.id)
    await _lease(db_url, [ids["a1"], ids["a2"]])
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute(
            "update public.todos set lease_expires_at = now() - interval '1 second' where id = %s",
            (ids["a2"],),
        )

    async with db.service() as a:
        assert await a.todo_complete([_item(ids["a1"], result={})]) == 1
        async with db.service() as claim:
            await asyncio.wait_for(
                claim.todo_claim(target="cloud", owner="dispatcher:other", limit=0), 5
            )
        _, todos = await _job(db_url, job.id)
        assert todos["a2"] == "running"  # skipped, not waited for
    async with db.service() as claim:
        await claim.todo_claim(target="cloud", owner="dispatcher:other", limit=0)
    _, todos = await _job(db_url, job.id)
    assert todos == {"a1": "done", "a2": "ready"}


async def test_a_report_that_completes_and_fails_in_one_job_beside_another_lane(
    db: store.Store,
    db_url: str,
    member_factory: MemberFactory,
    job_factory: JobFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The dispatcher's report completes a1 and then releases a2 in one transaction; just
    before the release, another lane starts completing a3 (same job). Without the report's
    gates taken first, the report would hold the shared gate and the job row (its completion's
    counts), the lane would wait for that row, and the release's exclusive gate would wait for
    the lane's shared one: 40P01. With them, the lane waits at the gate. (A report that fails a
    ToDo for good stores its completions of that job first, in a transaction of their own:
    test_a_report_that_ends_a_job_keeps_its_results_and_cancels_the_running_rest.)"""
    m = await member_factory()
    job = await job_factory(
        m,
        [
            {"key": "a1", "action": "noop"},
            {"key": "a2", "action": "noop", "max_attempts": 1},
            {"key": "a3", "action": "noop"},
            {"key": "b", "action": "noop", "depends_on": ["a1", "a3"]},
        ],
    )
    ids = await _ids(db_url, job.id)
    await _lease(db_url, [ids["a1"], ids["a2"], ids["a3"]])
    rows = {r.key: r for r in await _rows(db_url, [ids["a1"], ids["a2"]])}
    finished = [
        report._Finished(rows["a1"], executor.Done({})),
        report._Finished(rows["a2"], report.Release()),
    ]
    lane_done: list[int] = []
    loop = asyncio.get_running_loop()
    lane_pid: asyncio.Future[int] = loop.create_future()

    async def lane() -> None:
        async with db.service() as s:
            lane_pid.set_result(s.conn.info.backend_pid)
            lane_done.append(await s.todo_complete([_item(ids["a3"], result={})]))

    lanes: list[asyncio.Task[None]] = []
    real_release = store.Session.todo_release

    async def release_after_the_lane_waits(self: store.Session, *args: Any, **kw: Any) -> int:
        lanes.append(asyncio.create_task(lane()))
        assert await _waits_for_a_lock(db_url, await asyncio.wait_for(lane_pid, 10))
        return await real_release(self, *args, **kw)

    monkeypatch.setattr(store.Session, "todo_release", release_after_the_lane_waits)
    await asyncio.wait_for(
        dispatch.Dispatcher(db, owner=OWNER)._flush_batch(finished, dispatch.Summary()), 20
    )
    await asyncio.wait_for(lanes[0], 10)
    assert lane_done == [1]
    status, todos = await _job(db_url, job.id)
    assert status == "running"
    assert todos == {"a1": "done", "a2": "ready", "a3": "done", "b": "ready"}


async def test_a_report_that_ends_a_job_keeps_its_results_and_cancels_the_running_rest(
    db: store.Store, db_url: str, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    """A report completes a1 and fails a2 for good (same job) while a3 still runs elsewhere.
    a1's result is stored first (its own transaction), then the failure ends the job with
    every ToDo final: a3 is cancelled before the job's event, and its worker's late
    completion changes nothing (migration 20261207002100_terminal_event_last)."""
    m = await member_factory()
    job = await job_factory(
        m,
        [
            {"key": "a1", "action": "noop"},
            {"key": "a2", "action": "noop", "max_attempts": 1},
            {"key": "a3", "action": "noop"},
            {"key": "b", "action": "noop", "depends_on": ["a1", "a3"]},
        ],
    )
    ids = await _ids(db_url, job.id)
    await _lease(db_url, [ids["a1"], ids["a2"], ids["a3"]])
    rows = {r.key: r for r in await _rows(db_url, [ids["a1"], ids["a2"]])}
    finished = [
        report._Finished(rows["a1"], executor.Done({})),
        report._Finished(rows["a2"], executor.Fail("boom", retryable=False)),
    ]
    await dispatch.Dispatcher(db, owner=OWNER)._flush_batch(finished, dispatch.Summary())
    async with db.service() as s:
        assert await s.todo_complete([_item(ids["a3"], result={})]) == 0
    status, todos = await _job(db_url, job.id)
    assert status == "failed"
    assert todos == {"a1": "done", "a2": "failed", "a3": "cancelled", "b": "cancelled"}
    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        cur = await conn.execute(
            "select kind, status from public.job_events where job_id = %s order by id desc limit 1",
            (job.id,),
        )
        assert await cur.fetchone() == ("job.status", "failed")


async def _rows(db_url: str, todo_ids: list[str]) -> list[store.TodoRow]:
    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        cur = conn.cursor(row_factory=psycopg.rows.class_row(store.TodoRow))
        await cur.execute(
            "select id, job_id, tenant_id, key, action, params, attempts, max_attempts,"
            " timer_until, lease_expires_at, error from public.todos where id = any(%s::uuid[])",
            (todo_ids,),
        )
        return await cur.fetchall()


@pytest.mark.parametrize(
    ("outcomes", "gated"),
    [
        (["done"], False),
        (["done", "snooze"], False),
        (["fail"], False),
        (["done", "fail"], True),
        (["done", "release"], True),
    ],
)
def test_a_report_gates_first_when_it_mixes_shared_and_exclusive(
    outcomes: list[str], gated: bool
) -> None:
    """One job: the report takes its gates itself only when operations would ask in two modes."""
    row: Any = type("Row", (), {"job_id": "00000000-0000-0000-0000-000000000001"})()
    kinds = {
        "done": executor.Done({}),
        "snooze": executor.Snooze(until=datetime.now(UTC)),
        "fail": executor.Fail("x"),
        "release": report.Release(),
    }
    exclusive, shared = report._gates([report._Finished(row, kinds[o]) for o in outcomes])
    assert bool(exclusive & shared) is gated


async def test_an_expired_lease_of_a_cancelled_job_is_not_run_again(
    db: store.Store, db_url: str, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    """A cancel leaves a running ToDo to its lease holder. When that worker is lost, expiry
    used to requeue the ToDo and the next claim ran it again for a cancelled job; it ends
    cancelled now. A ToDo of a live job is still requeued."""
    m = await member_factory()
    gone = await job_factory(m, [{"key": "a", "action": "noop"}])
    live = await job_factory(m, [{"key": "a", "action": "noop"}])
    gone_ids, live_ids = await _ids(db_url, gone.id), await _ids(db_url, live.id)
    await _lease(db_url, [gone_ids["a"], live_ids["a"]])
    async with db.user(m.claims) as s:
        assert (await s.job_cancel(gone.id)).status == "cancelled"
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute(
            "update public.todos set lease_expires_at = now() - interval '1 second'"
            " where id = any(%s::uuid[])",
            ([gone_ids["a"], live_ids["a"]],),
        )
    async with db.service() as claim:
        rows = await claim.todo_claim(target="cloud", owner="dispatcher:other", limit=10)
    assert [str(r.id) for r in rows] == [live_ids["a"]]
    status, todos = await _job(db_url, gone.id)
    assert status == "cancelled" and todos == {"a": "cancelled"}


async def _settled(db_url: str, task: asyncio.Task[None], pid: asyncio.Future[int]) -> None:
    """Until ``task`` waits for a lock or has ended."""
    backend = await asyncio.wait_for(pid, 10)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while not task.done() and loop.time() < deadline:
        if await _waits_for_a_lock(db_url, backend, seconds=0.05):
            return
    assert task.done() or loop.time() < deadline, "the lane neither waited nor ended"


async def test_a_report_beside_a_complete_and_claim_that_picks_in_the_failing_job(
    db: store.Store,
    db_url: str,
    member_factory: MemberFactory,
    job_factory: JobFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Review finding 1. The report completes k1 (job K) and fails j1 (job J) for good; between
    its two operations the other lane completes k2 (K) and picks j2, a ready ToDo of J. Had the
    report completed first, it would hold K's row and wait for j2 in the failure, while the lane
    held j2 and waited for K's row: 40P01. The report fails before it completes."""
    m = await member_factory()
    jk = await job_factory(m, [{"key": "k1", "action": "noop"}, {"key": "k2", "action": "noop"}])
    jj = await job_factory(
        m,
        [{"key": "j1", "action": "noop", "max_attempts": 1}, {"key": "j2", "action": "noop"}],
    )
    k, j = await _ids(db_url, jk.id), await _ids(db_url, jj.id)
    await _lease(db_url, [k["k1"], k["k2"], j["j1"]])
    rows = {r.key: r for r in await _rows(db_url, [k["k1"], j["j1"]])}
    finished = [
        report._Finished(rows["k1"], executor.Done({})),
        report._Finished(rows["j1"], executor.Fail("boom", retryable=False)),
    ]
    lane_pid: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    lane_out: list[Any] = []

    async def lane() -> None:
        async with db.service() as s:
            lane_pid.set_result(s.conn.info.backend_pid)
            done, _ = await s.todo_complete_claim(
                [_item(k["k2"], result={})], target="cloud", owner="dispatcher:other", limit=5
            )
            lane_out.append(done)

    lanes: list[asyncio.Task[None]] = []
    calls: list[str] = []

    def second_starts_the_lane(name: str) -> Any:
        real = getattr(store.Session, name)

        async def hooked(self: store.Session, *args: Any, **kw: Any) -> int:
            calls.append(name)
            if len(calls) == 2:
                lanes.append(asyncio.create_task(lane()))
                await _settled(db_url, lanes[0], lane_pid)
            return int(await real(self, *args, **kw))

        return hooked

    for name in ("todo_fail", "todo_complete"):
        monkeypatch.setattr(store.Session, name, second_starts_the_lane(name))
    await asyncio.wait_for(
        dispatch.Dispatcher(db, owner=OWNER)._flush_batch(finished, dispatch.Summary()), 20
    )
    await asyncio.wait_for(lanes[0], 20)
    assert calls == ["todo_fail", "todo_complete"] and lane_out == [1]
    assert (await _job(db_url, jj.id))[0] == "failed"
    assert await _job(db_url, jk.id) == ("done", {"k1": "done", "k2": "done"})


async def test_a_claimed_pending_job_starts_after_the_counts(
    db: store.Store, db_url: str, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    """Review finding 2. T holds job B's row (a completion's counts) and will complete a ToDo of
    job A next. The lane completes b1 (B) and claims a2 of A, a pending job (a claim skipped
    its start). Had the lane started A before its counts, it would hold A's row while waiting
    for B's, and T would wait for A's: 40P01. It starts A after its counts."""
    m = await member_factory()
    one = await job_factory(m, [{"key": "x1", "action": "noop"}, {"key": "x2", "action": "noop"}])
    two = await job_factory(m, [{"key": "x1", "action": "noop"}, {"key": "x2", "action": "noop"}])
    a_job, b_job = (one, two) if str(one.id) > str(two.id) else (two, one)  # ids: B < A
    a, b = await _ids(db_url, a_job.id), await _ids(db_url, b_job.id)
    await _lease(db_url, [b["x1"], b["x2"], a["x1"]])
    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        await conn.execute("update public.jobs set status = 'pending' where id = %s", (a_job.id,))
    lane_pid: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    out: dict[str, Any] = {}

    async def lane() -> None:
        async with db.service() as s:
            lane_pid.set_result(s.conn.info.backend_pid)
            done, rows = await s.todo_complete_claim(
                [_item(b["x1"], result={})], target="cloud", owner="dispatcher:other", limit=5
            )
            out["lane"] = (done, sorted(str(r.id) for r in rows))

    async with db.service() as t:
        assert await t.todo_complete([_item(b["x2"], result={})]) == 1
        other = asyncio.create_task(lane())
        assert await _waits_for_a_lock(db_url, await asyncio.wait_for(lane_pid, 10))
        out["t"] = await t.todo_complete([_item(a["x1"], result={})])
    await asyncio.wait_for(other, 20)
    assert out == {"t": 1, "lane": (1, [a["x2"]])}
    assert (await _job(db_url, a_job.id))[0] == "running"


async def test_job_gate_takes_each_gate_once_exclusive_winning(db_url: str) -> None:
    """cpa.job_gate_v1: a job in both lists is gated exclusively, the others shared, nulls are
    ignored; the answer counts the jobs."""
    one, two = "00000000-0000-4000-8000-00000000000a", "00000000-0000-4000-8000-00000000000b"
    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        cur = await conn.execute(
            "select cpa.job_gate_v1(array[%s, null]::uuid[], array[%s, %s]::uuid[])",
            (one, one, two),
        )
        assert await cur.fetchone() == (2,)
        cur = await conn.execute(
            "select objid::integer, mode from pg_locks where locktype = 'advisory'"
            " and classid = 1785 and pid = pg_backend_pid() order by mode"
        )
        assert await cur.fetchall() == [(0xA, "ExclusiveLock"), (0xB, "ShareLock")]
