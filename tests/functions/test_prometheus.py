"""A real Prometheus scrapes a real ``serve``; promtool checks the shipped configuration.

Needs the ``prometheus`` binaries (Debian package ``prometheus``; ``.ci/run`` installs it).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import MemberFactory
from tests.functions.conftest import ISSUER, SECRET, bearer, free_port

ROOT = Path(__file__).resolve().parents[2]
OBS = ROOT / "infra" / "observability"
PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None,
    reason="the prometheus and promtool binaries are not installed "
    "(apt-get install prometheus; .ci/run does it)",
)


def promtool(*args: str) -> None:
    assert PROMTOOL is not None
    done = subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


@needs_prometheus
def test_promtool_accepts_the_shipped_config_and_rules() -> None:
    promtool("check", "config", str(OBS / "prometheus.yml"))
    promtool("check", "rules", str(OBS / "alerts.yml"))
    promtool("test", "rules", str(OBS / "alerts.test.yml"))


def dashboard_exprs() -> list[str]:
    board = json.loads((OBS / "grafana-dashboard.json").read_text("utf-8"))
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    return exprs


async def wait_for(url: str, proc: subprocess.Popen[bytes], log: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=1) as c:
        while time.monotonic() < deadline:
            try:
                if (await c.get(url)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise AssertionError(f"{proc.args!r} exited: {log.read_text()[-3000:]}")
            await asyncio.sleep(0.1)
    raise AssertionError(f"{url} did not answer in {seconds} s: {log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@pytest.fixture
def serve(db_url: str, tmp_path: Path) -> Iterator[str]:
    """``cpa-scheduler serve`` on the test database (API and dispatcher in one process)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(DATABASE_URL=db_url, SUPABASE_JWT_SECRET=SECRET, CPA_LOG_LEVEL="warning",
               SUPABASE_URL=ISSUER.removesuffix("/auth/v1"), CPA_DATA_DIR=str(tmp_path / "d"))  # fmt: skip
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cpa_scheduler.cli", "serve", "--port", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        asyncio.run(wait_for(f"http://127.0.0.1:{port}/healthz", proc, log, 60))
        yield f"127.0.0.1:{port}"
    finally:
        stop(proc)


@pytest.fixture
async def prometheus(serve: str, tmp_path: Path) -> AsyncIterator[str]:
    """Prometheus on 127.0.0.1 only, scraping ``serve`` every second, with the shipped rules."""
    assert PROMETHEUS is not None
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: [{json.dumps(str(OBS / 'alerts.yml'))}]\n"
        "scrape_configs:\n"
        f"  - job_name: cpa-api\n    static_configs: [{{targets: [{json.dumps(serve)}]}}]\n"
    )
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        await wait_for(f"http://127.0.0.1:{port}/-/ready", proc, log, 30)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


async def query(c: httpx.AsyncClient, expr: str) -> list[dict[str, Any]]:
    r = await c.get("/api/v1/query", params={"query": expr})
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", (expr, body)
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


async def eventually(c: httpx.AsyncClient, expr: str, want: float, seconds: float = 20) -> None:
    deadline, seen = time.monotonic() + seconds, None
    while time.monotonic() < deadline:
        result = await query(c, expr)
        seen = [float(s["value"][1]) for s in result]
        if seen == [want]:
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"{expr} stayed {seen}, wanted {want}")


@needs_prometheus
async def test_prometheus_sees_the_counter_rise_by_the_job_size(
    prometheus: str, serve: str, member_factory: MemberFactory
) -> None:
    member = await member_factory()
    async with httpx.AsyncClient(base_url=prometheus, timeout=10) as prom:
        await eventually(prom, 'cpa_todos_ready{job="cpa-api",target="cloud"}', 0)
        finished = 'sum(cpa_todos_finished_total{action="noop",status="done"}) or vector(0)'
        await eventually(prom, finished, 0)
        size = 7
        graph = {"todos": [{"key": f"t{i}", "action": "noop"} for i in range(size)]}
        desktop = {"todos": [{"key": f"d{i}", "action": "desktop.open_app", "target": "desktop",
                              "params": {"app": "Notes"}} for i in range(2)]}  # fmt: skip
        async with httpx.AsyncClient(base_url=f"http://{serve}", timeout=10) as api:
            for body in ({"graph": graph}, {"graph": desktop}):
                r = await api.post("/v1/jobs", json=body, headers=bearer(member))
                assert r.status_code == 201, r.text
        await eventually(prom, finished, size)
        # Desktop ToDos wait for an agent: the ready gauge (from the database) shows them.
        await eventually(prom, 'cpa_todos_ready{job="cpa-api",target="desktop"}', 2)
        await eventually(prom, "cpa_todos_waiting_for_agent", 2)
        assert await query(prom, 'cpa_oldest_ready_age_seconds{target="desktop"} >= 0')

        # Every dashboard expression parses and evaluates against the live server.
        for expr in dashboard_exprs():
            await query(prom, re.sub(r"\$__rate_interval", "1m", expr))
        rules = (await prom.get("/api/v1/rules")).json()["data"]["groups"]
        assert sum(len(g["rules"]) for g in rules) == 8
        # "unknown" until the first evaluation; "err" would be a rule Prometheus cannot run.
        assert all(r["health"] != "err" for g in rules for r in g["rules"]), rules


# --- two processes, the shipped scrape config --------------------------------------------------


@pytest.fixture
def worker(db_url: str, tmp_path: Path) -> Iterator[str]:
    """``cpa-scheduler dispatch`` (the long-running worker) with its /metrics, beside ``serve``."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(DATABASE_URL=db_url, CPA_LOG_LEVEL="warning", CPA_DATA_DIR=str(tmp_path / "w"))
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cpa_scheduler.cli", "dispatch", "--metrics-port", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        asyncio.run(wait_for(f"http://127.0.0.1:{port}/metrics", proc, log, 60))
        yield f"127.0.0.1:{port}"
    finally:
        stop(proc)


@pytest.fixture
async def prometheus_shipped(serve: str, worker: str, tmp_path: Path) -> AsyncIterator[str]:
    """Prometheus with infra/observability/prometheus.yml as shipped (its jobs and rules), only
    pointed at this test's two processes and scraping every second."""
    import yaml

    assert PROMETHEUS is not None
    shipped = yaml.safe_load((OBS / "prometheus.yml").read_text("utf-8"))
    shipped["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    shipped["rule_files"] = [str(OBS / name) for name in shipped["rule_files"]]
    targets = {"cpa-api": serve, "cpa-dispatcher": worker}
    assert sorted(j["job_name"] for j in shipped["scrape_configs"]) == sorted(targets)
    for job in shipped["scrape_configs"]:
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(shipped))
    port = free_port()
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        await wait_for(f"http://127.0.0.1:{port}/-/ready", proc, log, 30)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


def _database_counts(db_url: str) -> dict[str, float]:
    import psycopg

    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "select count(*) filter (where status = 'ready' and target = 'desktop'),"
            " count(*) filter (where status = 'confirming'),"
            " (select count(*) from public.jobs where status = 'running'),"
            " (select count(*) from public.jobs where status = 'pending')"
            " from public.todos"
        ).fetchone()
    assert row is not None
    return dict(
        zip(("ready_desktop", "confirming", "running", "pending"), map(float, row), strict=True)
    )


async def eventually_series(
    c: httpx.AsyncClient, expr: str, labels: dict[str, str], want: float, seconds: float = 20
) -> None:
    """Until the series of ``expr`` with ``labels`` has the value ``want``."""
    deadline, seen = time.monotonic() + seconds, None
    while time.monotonic() < deadline:
        result = await query(c, expr)
        seen = [float(s["value"][1]) for s in result
                if all(s["metric"].get(k) == v for k, v in labels.items())]  # fmt: skip
        if seen == [want]:
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"{expr} {labels} stayed {seen}, wanted {want}")


def _dashboard(title: str) -> list[str]:
    board = json.loads((OBS / "grafana-dashboard.json").read_text("utf-8"))
    return [t["expr"] for p in board["panels"] if p["title"] == title for t in p["targets"]]


@needs_prometheus
async def test_two_processes_scraped_with_the_shipped_config_count_the_database_once(
    prometheus_shipped: str, serve: str, db_url: str, member_factory: MemberFactory
) -> None:
    member = await member_factory()
    desktop = {"todos": [{"key": f"d{i}", "action": "desktop.open_app", "target": "desktop",
                          "params": {"app": "Notes"}} for i in range(3)]}  # fmt: skip
    confirm = {"todos": [{"key": "mail", "action": "email.send", "target": "desktop",
                          "params": {"to": "anna@example.com", "subject": "Hi", "body": "x"}}]}  # fmt: skip
    async with httpx.AsyncClient(base_url=f"http://{serve}", timeout=10) as api:
        for body in ({"graph": desktop}, {"graph": confirm}):
            r = await api.post("/v1/jobs", json=body, headers=bearer(member))
            assert r.status_code == 201, r.text
    want = _database_counts(db_url)
    assert want["ready_desktop"] == 3 and want["confirming"] == 1
    ready, running, waiting, confirming = _dashboard("Queue depth: ready and running ToDos")
    [jobs] = _dashboard("Jobs by status")
    async with httpx.AsyncClient(base_url=prometheus_shipped, timeout=10) as prom:
        # Both processes export the gauge: two series of 3 (sum would say 6) ...
        await eventually(prom, 'count(cpa_todos_ready{target="desktop"} == 3)', 2)
        await eventually(prom, 'sum(cpa_todos_ready{target="desktop"})', 6)
        # ... and what the dashboard and alerts show is the database's number.
        await eventually_series(prom, ready, {"target": "desktop"}, want["ready_desktop"])
        await eventually(prom, waiting, want["ready_desktop"])
        await eventually(prom, confirming, want["confirming"])
        await eventually_series(prom, jobs, {"status": "running"}, want["running"])
        await eventually_series(prom, jobs, {"status": "pending"}, want["pending"])
        [lease] = [e for e in _dashboard("Failures, retries and lease expiries")
                   if "cpa_todos_lease_expired" in e]  # fmt: skip
        await eventually(prom, lease, 0)
        rules = (await prom.get("/api/v1/rules")).json()["data"]["groups"]
        [expiry] = [r for g in rules for r in g["rules"] if r["name"] == "CpaLeaseExpiries"]
        assert "max by (target) (cpa_todos_lease_expired)" in expiry["query"]
        assert running  # evaluated in test_prometheus_sees_the_counter_rise_by_the_job_size
