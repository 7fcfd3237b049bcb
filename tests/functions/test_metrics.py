"""``GET /metrics``: process counters, gauges from the database, and the opt-ins."""

from __future__ import annotations

from typing import Any

import httpx
from cpa_scheduler import dispatch, store
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import JobFactory, MemberFactory
from tests.functions.conftest import bearer

GRAPH = {"todos": [{"key": k, "action": "noop", "params": {"n": i}} for i, k in enumerate("abc")]}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(client: httpx.AsyncClient, **kw: object) -> str:
    r = await client.get("/metrics", **kw)  # type: ignore[arg-type]
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return r.text


async def test_counters_rise_and_gauges_follow_the_queue(
    client: httpx.AsyncClient, db: store.Store, member_factory: MemberFactory
) -> None:
    member = await member_factory()
    before = await scrape(client)
    r = await client.post("/v1/jobs", json={"graph": GRAPH}, headers=bearer(member))
    assert r.status_code == 201, r.text
    queued = await scrape(client)
    assert value(queued, "cpa_todos_ready", target="cloud") == 3
    assert value(queued, "cpa_oldest_ready_age_seconds", target="cloud") >= 0
    assert value(queued, "cpa_jobs", status="pending") == 1
    assert value(queued, "cpa_todos_ready", target="desktop") == 0
    created = value(
        queued, "cpa_http_requests_total", method="POST", route="/v1/jobs", status="201"
    )
    assert created == value(before, "cpa_http_requests_total", method="POST", route="/v1/jobs",
                            status="201") + 1  # fmt: skip

    summary = await dispatch.Dispatcher(db).run_pass(5.0)
    assert summary.done == 3
    after = await scrape(client)
    finished = ("cpa_todos_finished_total", {"action": "noop", "status": "done"})
    assert value(after, finished[0], **finished[1]) - value(before, finished[0], **finished[1]) == 3
    assert value(after, "cpa_todos_ready", target="cloud") == 0
    assert value(after, "cpa_jobs", status="done") == 1
    assert value(after, "cpa_todo_run_seconds_count", action="noop") >= 3
    assert value(after, "cpa_metrics_database_up") == 1
    assert value(after, "cpa_dispatch_passes_total", outcome="ok") >= 1
    # Route templates, never raw paths: one series for every job id.
    await client.get(f"/v1/jobs/{r.json()['id']}", headers=bearer(member))
    text = await scrape(client)
    assert value(text, "cpa_http_requests_total", method="GET", route="/v1/jobs/{job_id}",
                 status="200") >= 1  # fmt: skip
    assert 'route="/v1/jobs/' + r.json()["id"] not in text
    assert "tenant_id" not in text  # no per-tenant series unless asked for


async def test_top_tenants_are_opt_in(
    client: httpx.AsyncClient, wire: Any, member_factory: MemberFactory
) -> None:
    busy, quiet = await member_factory("busy"), await member_factory("quiet")
    await client.post("/v1/jobs", json={"graph": GRAPH}, headers=bearer(busy))
    await client.post(
        "/v1/jobs", json={"graph": {"todos": GRAPH["todos"][:1]}}, headers=bearer(quiet)
    )
    wire(metrics_top_tenants=1)  # CPA_METRICS_TOP_TENANTS=1
    text = await scrape(client)
    assert value(text, "cpa_tenant_todos_ready", tenant_id=str(busy.tenant_id), target="cloud") == 3
    assert str(quiet.tenant_id) not in text


async def test_a_metrics_token_guards_the_endpoint(client: httpx.AsyncClient, wire: Any) -> None:
    wire(metrics_token="scrape-secret")  # CPA_METRICS_TOKEN
    r = await client.get("/metrics")
    assert r.status_code == 401
    assert "CPA_METRICS_TOKEN" in r.json()["detail"]
    await scrape(client, headers={"Authorization": "Bearer scrape-secret"})


async def test_the_worker_serves_the_database_gauges_too(
    db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    from cpa_scheduler import service, settings
    from cpa_scheduler.api import observe

    member = await member_factory()
    await job_factory(member, [{"key": "a", "action": "noop", "target": "cloud"}])
    transport = httpx.ASGITransport(
        app=observe.worker_app(service.Services(settings.Settings(), db))
    )
    async with httpx.AsyncClient(transport=transport, base_url="http://worker") as worker:
        assert (await worker.get("/healthz")).json() == {"status": "ok"}
        text = await scrape(worker)
    assert value(text, "cpa_todos_ready", target="cloud") == 1
    assert value(text, "cpa_jobs", status="pending") == 1
