"""The Lambda dispatcher handler with committed event fixtures and a fake context."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cpa_scheduler import dispatch, settings, store
from cpa_scheduler import invocation as fn

from tests.conftest import JobFactory, MemberFactory

EVENTS = Path(__file__).parents[1] / "fixtures" / "events"


def load_event(name: str) -> dict[str, Any]:
    return json.loads((EVENTS / name).read_text())


class FakeContext:
    def __init__(self, remaining_ms: int) -> None:
        self.remaining_ms = remaining_ms

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms


@pytest.fixture
def wired(db: store.Store, monkeypatch: pytest.MonkeyPatch) -> dispatch.Dispatcher:
    """Point the module-scope dispatcher at the test database, on the test's loop."""
    d = dispatch.Dispatcher(db)
    monkeypatch.setattr(fn, "_dispatcher", d)
    monkeypatch.setattr(fn, "_config", settings.Settings(dispatch_secret="kick-secret"))
    return d


def test_parses_every_event_shape() -> None:
    assert fn.Invocation.parse(load_event("scheduler.json")).source == "scheduler"
    assert fn.Invocation.parse(load_event("eventbridge_scheduled.json")).source == "eventbridge"
    kick = fn.Invocation.parse(load_event("function_url_kick.json"))
    assert kick.source == "http" and kick.authorization == "Bearer kick-secret"
    assert fn.Invocation.parse({}).source == "scheduler"


def test_budget_leaves_a_margin() -> None:
    assert fn.budget(FakeContext(10_000), 50.0) == pytest.approx(10 - fn.SAFETY_MARGIN_S)
    assert fn.budget(FakeContext(1_000), 50.0) == 0.0
    assert (
        fn.budget(None, settings.from_env({"CPA_DISPATCH_BUDGET": "12.5"}).dispatch_budget) == 12.5
    )


@pytest.mark.parametrize(
    "name", ["scheduler.json", "eventbridge_scheduled.json", "function_url_kick.json"]
)
async def test_handler_runs_a_pass(
    name: str, wired: dispatch.Dispatcher, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    await job_factory(m, [{"key": f"k{i}", "action": "noop"} for i in range(20)])
    summary = await wired.run_pass(fn.budget(FakeContext(30_000), 50.0))  # what handler() runs
    assert summary.done == 20
    invocation = fn.Invocation.parse(load_event(name))
    if invocation.source == "http":
        assert fn._authorized(invocation, "kick-secret")


async def test_short_context_stops_in_time(
    wired: dispatch.Dispatcher, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    await job_factory(m, [{"key": "slow", "action": "noop", "params": {"duration_ms": 5000}}])
    summary = await wired.run_pass(fn.budget(FakeContext(3_500), 50.0))
    assert summary.elapsed < 2.0 and summary.done == 0


def test_kick_with_a_wrong_secret_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CPA_DISPATCH_SECRET", "other")
    monkeypatch.setattr(fn, "_config", None)  # read from the environment, once per container
    answer = fn.handler(load_event("function_url_kick.json"), FakeContext(10_000))
    assert answer["statusCode"] == 401
    assert "CPA_DISPATCH_SECRET" in json.loads(answer["body"])["detail"]


@pytest.mark.parametrize(
    "name", ["scheduler.json", "eventbridge_scheduled.json", "function_url_kick.json"]
)
async def test_real_handler_end_to_end(
    name: str,
    db_url: str,
    db: store.Store,
    member_factory: MemberFactory,
    job_factory: JobFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import asyncio

    m = await member_factory()
    job = await job_factory(
        m, [{"key": "a", "action": "noop"}, {"key": "b", "action": "noop", "depends_on": ["a"]}]
    )
    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.setenv("CPA_DISPATCH_SECRET", "kick-secret")
    monkeypatch.setattr(fn, "_config", None)
    monkeypatch.setattr(fn, "_loop", None)
    monkeypatch.setattr(fn, "_dispatcher", None)
    try:
        answer = await asyncio.to_thread(fn.handler, load_event(name), FakeContext(20_000))
    finally:

        def close() -> None:
            if fn._dispatcher is not None and fn._loop is not None:
                fn._loop.run_until_complete(fn._dispatcher.store.close())
                fn._loop.close()

        await asyncio.to_thread(close)
    summary = json.loads(answer["body"]) if "body" in answer else answer
    assert summary["done"] == 2 and summary["claimed"] == 2
    async with db.user(m.claims) as s:
        assert (await s.job_get(job.id)).status == "done"


def test_a_lambda_pass_leaves_an_emf_line(capsys: pytest.CaptureFixture[str]) -> None:
    fn._emf({"claimed": 4, "done": 3, "failed": 1, "retried": 0, "timers": 0, "elapsed": 0.25})
    line = json.loads(capsys.readouterr().out)
    assert line["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "CpaScheduler"
    assert (line["TodosDone"], line["TodosFailed"], line["PassSeconds"]) == (3.0, 1.0, 0.25)
    assert line["Function"] == "dispatcher"


def test_the_handler_exits_quietly(db_url: str) -> None:
    """A process that ran the handler ends without asyncio's complaints about the loop it kept
    (the pool's tasks destroyed while pending, a closed loop)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    code = "from functions.dispatcher import handler; print(handler({})['claimed'])"
    env = {**os.environ, "DATABASE_URL": db_url, "CPA_DISPATCH_BUDGET": "1",
           "PYTHONPATH": str(root)}  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "0"
    for noise in ("Task was destroyed", "Event loop is closed", "Traceback", "Exception ignored"):
        assert noise not in run.stderr, run.stderr
