"""The dispatch pass against real Postgres: dependency order, timers, refs, errors."""

from __future__ import annotations

import random
from typing import Any

from cpa_scheduler import dispatch, errors, executor, store

from tests.conftest import JobFactory, Member, MemberFactory, register_action


async def todos_of(db: store.Store, m: Member, job_id: Any) -> dict[str, dict[str, Any]]:
    async with db.user(m.claims) as s:
        return {t["key"]: t for t in await s.job_todos(job_id)}


async def test_random_dag_start_times_respect_dependencies(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    rnd = random.Random(7)
    todos = []
    for i in range(100):
        deps = sorted({f"t{rnd.randrange(i)}" for _ in range(rnd.randint(0, 3))}) if i else []
        todos.append(
            {"key": f"t{i}", "action": "noop", "params": {"duration_ms": 5}, "depends_on": deps}
        )
    m = await member_factory()
    job = await job_factory(m, todos)
    summary = await dispatch.Dispatcher(db, concurrency=16).run_pass(60)
    assert summary.done == 100 and summary.failed == 0
    rows = await todos_of(db, m, job.id)
    for t in todos:
        for dep in t["depends_on"]:
            assert rows[t["key"]]["started_at"] >= rows[dep]["finished_at"]
    async with db.user(m.claims) as s:
        assert (await s.job_get(job.id)).status == "done"


async def test_refs_are_resolved_from_dependency_results(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    job = await job_factory(
        m,
        [
            {"key": "a", "action": "noop", "params": {"text": "hallo", "items": [1, 2]}},
            {"key": "b", "action": "noop", "depends_on": ["a"]},
            {
                "key": "c",
                "action": "noop",
                "depends_on": ["b"],
                "params": {"t": {"$ref": "a.result.text"}, "second": {"$ref": "a.result.items.1"}},
            },
        ],
    )
    await dispatch.Dispatcher(db).run_pass(30)
    rows = await todos_of(db, m, job.id)
    assert rows["c"]["result"] == {"t": "hallo", "second": 2}


async def test_missing_ref_fails_with_its_name(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    job = await job_factory(
        m,
        [
            {"key": "a", "action": "noop", "params": {"text": "x"}},
            {
                "key": "b",
                "action": "noop",
                "depends_on": ["a"],
                "params": {"t": {"$ref": "a.result.nope"}},
            },
        ],
    )
    summary = await dispatch.Dispatcher(db).run_pass(30)
    assert summary.failed == 1
    async with db.user(m.claims) as s:
        final = await s.job_get(job.id)
    assert final.status == "failed" and "'a.result.nope'" in final.error


async def test_wait_is_a_timer_that_holds_no_worker(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    job = await job_factory(
        m,
        [
            {"key": "w", "action": "wait", "params": {"seconds": 0.5}},
            {"key": "n", "action": "notify", "depends_on": ["w"], "params": {"message": "Tee!"}},
        ],
    )
    d = dispatch.Dispatcher(db)
    first = await d.run_pass(5)
    assert first.timers == 1 and first.done == 0  # parked, the pass ended at once
    assert first.elapsed < 0.5
    rows = await todos_of(db, m, job.id)
    assert rows["w"]["status"] == "ready" and rows["w"]["timer_until"] is not None
    import asyncio

    await asyncio.sleep(0.6)
    second = await d.run_pass(5)
    assert second.done == 2
    async with db.user(m.claims) as s:
        events = await s.event_list(job.id)
    assert any(e["kind"] == "notification" and e["data"]["message"] == "Tee!" for e in events)


async def test_llm_actions_fail_clearly_without_a_provider(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    job = await job_factory(
        m,
        [
            {"key": "g", "action": "llm.generate", "params": {"prompt": "hi"}},
            {"key": "ok", "action": "noop"},
        ],
    )
    summary = await dispatch.Dispatcher(db).run_pass(10)
    assert summary.failed == 1
    async with db.user(m.claims) as s:
        final = await s.job_get(job.id)
    assert "No LLM provider is configured" in final.error


async def test_retryable_errors_back_off(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    calls = 0

    async def flaky(params: dict[str, Any], ctx: executor.Context) -> executor.Outcome:
        nonlocal calls
        calls += 1
        if calls < 2:
            raise errors.RetryableError("upstream 503")
        return executor.Done({"ok": True})

    reg = executor.builtin()
    reg.register("flaky", flaky)
    m = await member_factory()
    await register_action(db, "flaky")
    job = await job_factory(m, [{"key": "f", "action": "flaky"}])
    d = dispatch.Dispatcher(db, registry=reg, backoff_base=0.2)
    first = await d.run_pass(5)
    assert first.retried == 1
    import asyncio

    await asyncio.sleep(0.3)
    second = await d.run_pass(5)
    assert second.done == 1
    rows = await todos_of(db, m, job.id)
    assert rows["f"]["attempts"] == 2 and rows["f"]["result"] == {"ok": True}


async def test_executors_answer_outcomes_and_the_dispatcher_acts_on_them(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    from datetime import UTC, datetime, timedelta

    async def later(params: dict[str, Any], ctx: executor.Context) -> executor.Outcome:
        if ctx.timer_until is None:  # any executor may snooze, not only wait
            return executor.Snooze(datetime.now(UTC) + timedelta(seconds=0.2))
        return executor.Done({"snoozed_until": ctx.timer_until.isoformat()})

    async def untyped(params: dict[str, Any], ctx: executor.Context) -> Any:
        return {"plain": "dict"}

    reg = executor.builtin()
    reg.register("later", later)
    reg.register("untyped", untyped)
    m = await member_factory()
    for action in ("later", "untyped"):
        await register_action(db, action)
    # Two jobs: a ToDo failing for good ends its job, and the job's other ToDos with it.
    job = await job_factory(m, [{"key": "l", "action": "later"}])
    other = await job_factory(m, [{"key": "u", "action": "untyped"}])
    d = dispatch.Dispatcher(db, registry=reg)
    first = await d.run_pass(5)
    assert (first.timers, first.failed) == (1, 1), first.as_dict()
    import asyncio

    await asyncio.sleep(0.3)
    assert (await d.run_pass(5)).done == 1
    rows = await todos_of(db, m, job.id)
    assert rows["l"]["status"] == "done" and "snoozed_until" in rows["l"]["result"]
    rows = await todos_of(db, m, other.id)
    assert rows["u"]["status"] == "failed"
    assert "answered dict, not an outcome" in rows["u"]["error"]


async def test_budget_stops_the_pass_and_releases_leases(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    job = await job_factory(m, [{"key": "slow", "action": "noop", "params": {"duration_ms": 3000}}])
    summary = await dispatch.Dispatcher(db).run_pass(0.3)
    assert summary.elapsed < 1.5 and summary.done == 0
    rows = await todos_of(db, m, job.id)
    assert rows["slow"]["status"] == "ready" and rows["slow"]["attempts"] == 0


async def test_executors_may_suspend_fail_and_keep_their_context(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    """Each ToDo runs in a context of its own: one that answers at once and one that awaits
    both report their result, one that raises fails, and none leaks its context."""
    import asyncio
    import contextvars

    seen: contextvars.ContextVar[str] = contextvars.ContextVar("seen", default="unset")

    async def remember(params: dict[str, Any], ctx: executor.Context) -> executor.Outcome:
        seen.set(ctx.key)
        for _ in range(params.get("sleeps", 0)):
            await asyncio.sleep(0.01)
        if params.get("boom"):
            raise RuntimeError("boom")
        return executor.Done({"seen": seen.get()})

    reg = executor.builtin()
    reg.register("remember", remember)
    await register_action(db, "remember")
    m = await member_factory()
    job = await job_factory(m, [
        {"key": "now", "action": "remember"},
        {"key": "later", "action": "remember", "params": {"sleeps": 3}},
        {"key": "after", "action": "remember", "depends_on": ["later"]},
    ])  # fmt: skip
    failing = await job_factory(m, [
        {"key": "bad", "action": "remember", "params": {"sleeps": 1, "boom": True}},
    ])  # fmt: skip
    summary = await dispatch.Dispatcher(db, registry=reg).run_pass(10)
    assert (summary.done, summary.failed) == (3, 1), summary.as_dict()
    assert seen.get() == "unset"
    rows = await todos_of(db, m, job.id)
    assert rows["now"]["result"] == {"seen": "now"}
    assert rows["later"]["result"] == {"seen": "later"}
    assert rows["after"]["result"] == {"seen": "after"}
    bad = (await todos_of(db, m, failing.id))["bad"]
    assert bad["status"] == "failed" and "boom" in bad["error"]


async def test_the_executor_of_a_cancelled_running_todo_is_stopped_and_others_run_on(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    """A ToDo no longer leased to the dispatcher (here: its job was cancelled while it ran) has
    its executor cancelled at the next lease check (a quarter lease), not run to its end; a
    ToDo still leased to it keeps running, its lease extended, and is done."""
    import asyncio

    started: dict[str, asyncio.Event] = {"long": asyncio.Event(), "short": asyncio.Event()}
    stopped: list[str] = []

    async def slow(params: dict[str, Any], ctx: executor.Context) -> executor.Outcome:
        started[ctx.key].set()
        try:
            await asyncio.sleep(params["seconds"])
        except asyncio.CancelledError:
            stopped.append(ctx.key)
            raise
        return executor.Done({"slept": params["seconds"]})

    reg = executor.builtin()
    reg.register("slow", slow)
    m = await member_factory()
    await register_action(db, "slow")
    doomed = await job_factory(m, [{"key": "long", "action": "slow", "params": {"seconds": 30}},
                                   {"key": "next", "action": "noop", "depends_on": ["long"]}])  # fmt: skip
    kept = await job_factory(m, [{"key": "short", "action": "slow", "params": {"seconds": 1.5}}])
    d = dispatch.Dispatcher(db, registry=reg, lease_seconds=2)  # a lease check every 0.5 s
    runner = asyncio.create_task(d.run_pass(20))
    for event in started.values():
        await asyncio.wait_for(event.wait(), 10)
    async with db.user(m.claims) as s:
        await s.job_cancel(doomed.id)
    summary = await asyncio.wait_for(runner, 15)
    assert stopped == ["long"]
    assert summary.done == 1 and summary.elapsed < 10, summary.as_dict()
    rows = await todos_of(db, m, doomed.id)
    assert rows["long"]["status"] == "cancelled" and rows["long"]["result"] is None
    assert rows["next"]["status"] == "cancelled"
    rows = await todos_of(db, m, kept.id)
    assert rows["short"]["status"] == "done" and rows["short"]["result"] == {"slept": 1.5}
