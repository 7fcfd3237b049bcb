"""Crash safety, concurrent passes, long-running mode, cancel and confirmation during dispatch."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from typing import Any

import psycopg
from cpa_scheduler import agent, dispatch, protocol, store

from tests.conftest import JobFactory, Member, MemberFactory, register_action


async def job_state(db: store.Store, m: Member, job_id: Any) -> tuple[str, dict[str, str]]:
    async with db.user(m.claims) as s:
        job = await s.job_get(job_id)
        return job.status, {t["key"]: t["status"] for t in await s.job_todos(job_id)}


async def done_events_per_todo(db_url: str, job_id: Any) -> dict[str, int]:
    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        cur = await conn.execute(
            "select todo_id::text, count(*) from public.job_events where job_id = %s and kind = 'todo.status'"
            " and status = 'done' group by todo_id",
            (job_id,),
        )
        return {row[0]: row[1] for row in await cur.fetchall()}


async def test_sigkill_mid_job_loses_nothing(
    db: store.Store, db_url: str, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    todos = [
        {
            "key": f"t{i}",
            "action": "noop",
            "params": {"duration_ms": 60},
            "depends_on": [f"t{i - 100}"] if i >= 100 else [],
        }
        for i in range(300)
    ]
    job = await job_factory(m, todos)
    env = {**os.environ, "DATABASE_URL": db_url}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cpa_scheduler.cli",
            "dispatch",
            "--once",
            "--budget",
            "60",
            "--lease",
            "2",
            "--concurrency",
            "16",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Kill it while some ToDos are done and others are held. Between a poll and the kill the
    # held ToDos could all end, so freeze the process (SIGSTOP), look, and kill it only if the
    # frozen state holds leases; otherwise let it go on. A loaded machine can take many seconds
    # to start the process, so wait by the clock.
    deadline = time.monotonic() + 60
    while True:
        _, st = await job_state(db, m, job.id)
        if list(st.values()).count("done") >= 40 and "running" in st.values():
            proc.send_signal(signal.SIGSTOP)
            await asyncio.sleep(0.2)  # a statement the server was running when it froze ends
            _, st = await job_state(db, m, job.id)
            if "running" in st.values():
                break
            proc.send_signal(signal.SIGCONT)
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            proc.wait(10)
            raise AssertionError(f"never caught the dispatcher mid-job: {sorted(st.values())}")
        await asyncio.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    status, st = await job_state(db, m, job.id)
    assert status == "running" and "running" in st.values()
    await asyncio.sleep(2.2)  # the dead worker's leases expire
    summary = await dispatch.Dispatcher(db, lease_seconds=10).run_pass(60)
    assert summary.failed == 0
    status, st = await job_state(db, m, job.id)
    assert status == "done" and set(st.values()) == {"done"}
    per_todo = await done_events_per_todo(db_url, job.id)
    assert len(per_todo) == 300 and set(per_todo.values()) == {1}


async def test_three_concurrent_passes_never_run_a_todo_twice(
    db: store.Store, db_url: str, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    runs: dict[str, int] = {}

    from cpa_scheduler import executor

    async def counting(params: dict[str, Any], ctx: Any) -> executor.Outcome:
        runs[ctx.key] = runs.get(ctx.key, 0) + 1
        await asyncio.sleep(0.001)
        return executor.Done({})

    m = await member_factory()
    await register_action(db, "count")
    job = await job_factory(m, [{"key": f"w{i}", "action": "count"} for i in range(600)])
    passes = []
    for _ in range(3):
        reg = executor.builtin()
        reg.register("count", counting)
        passes.append(dispatch.Dispatcher(db, registry=reg, concurrency=20).run_pass(60))
    summaries = await asyncio.gather(*passes)
    assert sum(s.done for s in summaries) == 600
    assert all(s.claimed > 0 for s in summaries)
    assert len(runs) == 600 and set(runs.values()) == {1}
    assert (await job_state(db, m, job.id))[0] == "done"


async def test_cancel_during_a_pass(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    job = await job_factory(
        m,
        [
            {"key": "slow", "action": "noop", "params": {"duration_ms": 600}},
            {"key": "next", "action": "noop", "depends_on": ["slow"]},
            {"key": "other", "action": "noop", "depends_on": ["slow"]},
        ],
    )
    d = dispatch.Dispatcher(db)
    task = asyncio.create_task(d.run_pass(10))
    await asyncio.sleep(0.3)
    async with db.user(m.claims) as s:
        await s.job_cancel(job.id)
    summary = await task
    # The running ToDo ended with the job (its event before the job's); its late result is
    # dropped and nothing new started.
    assert summary.done == 0
    status, st = await job_state(db, m, job.id)
    assert status == "cancelled" and st == {
        "slow": "cancelled",
        "next": "cancelled",
        "other": "cancelled",
    }


async def test_confirmation_gates_dispatch(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    job = await job_factory(
        m,
        [
            {
                "key": "call",
                "action": "http.request",
                "requires_confirmation": True,
                "params": {"url": "https://example.invalid/"},
            }
        ],
    )
    summary = await dispatch.Dispatcher(db).run_pass(2)
    assert summary.claimed == 0
    async with db.user(m.claims) as s:
        [todo] = await s.job_todos(job.id)
        assert todo["status"] == "confirming"


async def test_long_running_mode_wakes_on_notify_and_stops_on_signal(
    db: store.Store, db_url: str, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    stop = asyncio.Event()
    d = dispatch.Dispatcher(db)
    runner = asyncio.create_task(d.run_forever(db_url, stop=stop, sweep_interval=30))
    await asyncio.sleep(0.3)
    t0 = time.monotonic()
    job = await job_factory(
        m, [{"key": "a", "action": "noop"}, {"key": "b", "action": "noop", "depends_on": ["a"]}]
    )
    for _ in range(100):
        if (await job_state(db, m, job.id))[0] == "done":
            break
        await asyncio.sleep(0.02)
    assert (await job_state(db, m, job.id))[0] == "done"
    assert time.monotonic() - t0 < 2.0  # woken by NOTIFY, not by the 30 s sweep
    slow = await job_factory(m, [{"key": "s", "action": "noop", "params": {"duration_ms": 500}}])
    await asyncio.sleep(0.2)
    stop.set()  # what SIGTERM does: stop claiming, finish what it holds
    total = await asyncio.wait_for(runner, 5)
    assert total.done == 3
    assert (await job_state(db, m, slow.id))[0] == "done"


async def test_desktop_flow_assign_agree_done(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    job = await job_factory(
        m,
        [
            {"key": "n", "action": "noop", "params": {"app": "Spotify"}},
            {
                "key": "open",
                "action": "desktop.open_app",
                "target": "desktop",
                "depends_on": ["n"],
                "params": {"app": {"$ref": "n.result.app"}},
            },
        ],
    )
    await dispatch.Dispatcher(db).run_pass(5)
    async with db.user(m.claims) as s:
        assigns = await agent.claim(
            s, tenant_id=m.tenant_id, agent_id="laptop", actions=["desktop.open_app"]
        )
    assert len(assigns) == 1
    assign = assigns[0]
    assert assign.payload.params == {"app": "Spotify"} and assign.payload.key == "open"
    agree = protocol.reply_to(assign, "agree", {"todo_id": assign.payload.todo_id})
    done = protocol.reply_to(
        assign, "done", {"todo_id": assign.payload.todo_id, "result": {"opened": True}}
    )
    async with db.user(m.claims) as s:
        assert (await agent.apply(s, agree)).type == "inform"
        answer = await agent.apply(s, done)
    assert answer.type == "agree" and answer.in_reply_to == done.id
    async with db.user(m.claims) as s:
        again = await agent.apply(s, done)  # a repeated done is harmless
    assert again.type == "agree" and again.payload.text == "already done"  # type: ignore[union-attr]
    assert (await job_state(db, m, job.id))[0] == "done"


async def test_desktop_refuse_releases_for_another_agent(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    await job_factory(
        m, [{"key": "o", "action": "desktop.open_app", "target": "desktop", "params": {"app": "X"}}]
    )
    async with db.user(m.claims) as s:
        [a1] = await agent.claim(s, tenant_id=m.tenant_id, agent_id="one", actions=None)
        refuse = protocol.reply_to(
            a1, "refuse", {"todo_id": a1.payload.todo_id, "reason": "no such app"}
        )
        assert (await agent.apply(s, refuse)).type == "inform"
    async with db.user(m.claims) as s:
        [a2] = await agent.claim(s, tenant_id=m.tenant_id, agent_id="two", actions=None)
        assert a2.payload.todo_id == a1.payload.todo_id and a2.payload.attempt == 1
        late = protocol.reply_to(a1, "done", {"todo_id": a1.payload.todo_id, "result": 1})
        answer = await agent.apply(s, late)
    assert answer.type == "refuse" and answer.payload.code == "lease_not_held"  # type: ignore[union-attr]
