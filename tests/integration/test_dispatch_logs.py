"""The dispatcher logs each pass's summary at info and every failure with its cause."""

from __future__ import annotations

import json
import logging

import pytest
from cpa_scheduler import dispatch, logs, store

from tests.conftest import JobFactory, MemberFactory


async def test_a_pass_logs_its_summary_and_each_failure(
    db: store.Store,
    member_factory: MemberFactory,
    job_factory: JobFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    member = await member_factory()
    job = await job_factory(member, [
        {"key": "ok", "action": "noop", "target": "cloud"},
        {"key": "bad", "action": "http.request", "target": "cloud", "max_attempts": 1,
         "params": {"url": "http://127.0.0.1:9/private"}},
    ])  # fmt: skip
    caplog.set_level(logging.INFO, logger="cpa.dispatch")
    await dispatch.Dispatcher(db).run_pass(5.0)

    (failure,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "'bad' (http.request) failed on attempt 1 of 1" in failure.getMessage()
    assert "private, loopback or link-local" in failure.getMessage()  # the cause
    line = json.loads(logs.JsonFormatter().format(failure))
    assert line["job_id"] == str(job.id) and line["tenant_id"] == str(member.tenant_id)
    assert line["todo_id"] and line["action"] == "http.request" and line["retry"] is False

    (summary,) = [r for r in caplog.records if r.getMessage().startswith("dispatch pass")]
    assert summary.levelno == logging.INFO
    assert summary.summary["done"] == 1 and summary.summary["failed"] == 1  # type: ignore[attr-defined]
    assert json.loads(logs.JsonFormatter().format(summary))["summary"]["claimed"] == 2
