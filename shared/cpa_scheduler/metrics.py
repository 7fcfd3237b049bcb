"""Prometheus metrics: process counters and histograms, plus gauges read from the database.

Process metrics (requests, ToDo run time, finished ToDos, claims, lease expiries, retries) live
in :func:`instruments` (made on first use) and count what this process did. Queue gauges are computed from the
database each time ``/metrics`` is scraped (:func:`render`), so they are true however many
processes or Lambda invocations do the work. Every process with ``/metrics`` (serve, the API
function, the dispatcher worker) exports them, as the contract has it, each the same
database-wide value: dashboards and alerts aggregate them across processes with ``max``, never
``sum`` (``infra/observability/``), while the process counters are summed. No metric has a tenant label by default;
``CPA_METRICS_TOP_TENANTS=N`` adds ``cpa_tenant_todos_ready`` for the N busiest tenants only.

On Lambda a process lives for a few invocations, so its counters go out as CloudWatch Embedded
Metric Format lines instead (:func:`emf_line`).
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
    from prometheus_client.core import Metric

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_RUN_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


@dataclass(frozen=True)
class Instruments:
    """This process's metrics, in their own registry."""

    registry: CollectorRegistry
    http_requests: Counter
    http_duration: Histogram
    todo_run: Histogram
    todos_finished: Counter
    claimed: Histogram
    passes: Counter
    last_pass: Gauge
    lease_expiries: Counter
    retries: Counter
    database_up: Gauge
    a2a_requests: Counter


@functools.cache
def instruments() -> Instruments:
    """The metrics, made on first use: prometheus_client stays out of the Lambda cold import."""
    from prometheus_client import (
        CollectorRegistry,
        Counter,
        Gauge,
        Histogram,
        disable_created_metrics,
    )

    disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created twin per counter
    registry = CollectorRegistry(auto_describe=True)
    return Instruments(
        registry=registry,
        http_requests=Counter(
            "cpa_http_requests",
            "HTTP requests answered, by route template, method and status.",
            ["method", "route", "status"],
            registry=registry,
        ),
        http_duration=Histogram(
            "cpa_http_request_duration_seconds",
            "Time to answer an HTTP request, by route template and method.",
            ["method", "route"],
            registry=registry,
        ),
        todo_run=Histogram(
            "cpa_todo_run_seconds",
            "Time a cloud ToDo's executor ran, by action.",
            ["action"],
            buckets=_RUN_BUCKETS,
            registry=registry,
        ),
        todos_finished=Counter(
            "cpa_todos_finished",
            "Cloud ToDos this process finished: done, failed (terminal) or retry (will run again).",
            ["action", "status"],
            registry=registry,
        ),
        claimed=Histogram(
            "cpa_dispatch_claimed_per_pass",
            "ToDos one dispatch pass claimed.",
            buckets=(0, 1, 5, 10, 50, 100, 500, 1000, 5000),
            registry=registry,
        ),
        passes=Counter(
            "cpa_dispatch_passes",
            "Dispatch passes, by outcome (ok or error).",
            ["outcome"],
            registry=registry,
        ),
        last_pass=Gauge(
            "cpa_dispatch_last_success_timestamp_seconds",
            "Unix time the last dispatch pass of this process ended without error.",
            registry=registry,
        ),
        lease_expiries=Counter(
            "cpa_lease_expiries",
            "ToDos this process claimed again after an earlier attempt's lease had expired.",
            ["target"],
            registry=registry,
        ),
        retries=Counter(
            "cpa_todo_retries",
            "Failed attempts of cloud ToDos that will be retried, by action.",
            ["action"],
            registry=registry,
        ),
        database_up=Gauge(
            "cpa_metrics_database_up",
            "1 when the last scrape could read the database gauges, else 0.",
            registry=registry,
        ),
        a2a_requests=Counter(
            "cpa_a2a_requests",
            "A2A JSON-RPC calls, by method and outcome (ok, or the JSON-RPC error code).",
            ["method", "outcome"],
            registry=registry,
        ),
    )


LEASE_EXPIRED_PREFIX = "The lease expired during attempt"


def observe_claim(last_errors: Iterable[str | None], target: str = "cloud") -> None:
    """Count the claimed ToDos (by their last error) that were requeued as a lease expired."""
    for error in last_errors:
        if error is not None and error.startswith(LEASE_EXPIRED_PREFIX):
            instruments().lease_expiries.labels(target).inc()


def observe_pass(claimed: int, *, ok: bool) -> None:
    found = instruments()
    found.claimed.observe(claimed)
    found.passes.labels("ok" if ok else "error").inc()
    if ok:
        found.last_pass.set(time.time())


def observe_run(action: str, seconds: float) -> None:
    """One executor run of ``action`` that took ``seconds``."""
    _child(instruments().todo_run, action).observe(seconds)


def observe_finished(action: str, status: str, count: int = 1) -> None:
    """``count`` ToDos of ``action`` finished with ``status`` (done, failed or retry)."""
    found = instruments()
    _child(found.todos_finished, action, status).inc(count)
    if status == "retry":
        _child(found.retries, action).inc(count)


# Labelled children by metric and labels: prometheus_client's ``labels()`` takes a lock and
# builds the key on every call (~2 us), which the dispatcher paid per ToDo. Keyed by the metric
# object, so a new registry (``instruments`` made again) gets children of its own.
_children: dict[tuple[int, tuple[str, ...]], tuple[Any, Any]] = {}


def _child(metric: Any, *labels: str) -> Any:
    key = (id(metric), labels)
    found = _children.get(key)
    if found is None or found[0] is not metric:
        found = _children[key] = (metric, metric.labels(*labels))
    return found[1]


# --- gauges from the database ----------------------------------------------------------------


class _Snapshot:
    """Yields the families of one database snapshot (a fresh instance per scrape)."""

    def __init__(self, rows: list[dict[str, Any]], tenants: list[dict[str, Any]] | None) -> None:
        self.rows = rows
        self.tenants = tenants

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        ready = GaugeMetricFamily(
            "cpa_todos_ready", "ToDos that may start now and wait for a worker.", labels=["target"]
        )
        age = GaugeMetricFamily(
            "cpa_oldest_ready_age_seconds",
            "How long the oldest ready ToDo has waited (0 when none is ready).",
            labels=["target"],
        )
        running = GaugeMetricFamily(
            "cpa_todos_running", "ToDos leased to a worker or agent.", labels=["target"]
        )
        expired = GaugeMetricFamily(
            "cpa_todos_lease_expired",
            "Running ToDos whose lease has expired and that the next claim will requeue.",
            labels=["target"],
        )
        confirming = GaugeMetricFamily(
            "cpa_todos_confirming", "ToDos waiting for the user's approval.", labels=["target"]
        )
        waiting = GaugeMetricFamily(
            "cpa_todos_waiting_for_agent", "Desktop ToDos ready and not yet claimed by an agent."
        )
        jobs = GaugeMetricFamily("cpa_jobs", "Jobs by status.", labels=["status"])
        for row in self.rows:
            if row["kind"] == "todo":
                target = str(row["label"])
                ready.add_metric([target], row["ready"])
                age.add_metric([target], row["oldest_ready_age"])
                running.add_metric([target], row["running"])
                expired.add_metric([target], row["lease_expired"])
                confirming.add_metric([target], row["confirming"])
                if target == "desktop":
                    waiting.add_metric([], row["ready"])
            else:
                jobs.add_metric([str(row["label"])], row["ready"])
        yield from (ready, age, running, expired, confirming, waiting, jobs)
        if self.tenants is not None:
            top = GaugeMetricFamily(
                "cpa_tenant_todos_ready",
                "Ready ToDos of the busiest tenants (opt-in: CPA_METRICS_TOP_TENANTS).",
                labels=["tenant_id", "target"],
            )
            for t in self.tenants:
                top.add_metric([str(t["tenant_id"]), str(t["target"])], t["ready"])
            yield top


def render(
    snapshot: list[dict[str, Any]] | None, tenants: list[dict[str, Any]] | None = None
) -> bytes:
    """The exposition text: this process's metrics, then the database gauges (if read)."""
    from prometheus_client import CollectorRegistry, generate_latest

    text = generate_latest(instruments().registry)
    if snapshot is not None:
        scrape = CollectorRegistry(auto_describe=False)
        scrape.register(_Snapshot(snapshot, tenants))
        text += generate_latest(scrape)
    return text


# --- CloudWatch Embedded Metric Format ---------------------------------------------------------


def emf_line(namespace: str, values: Mapping[str, float], dimensions: Mapping[str, str]) -> str:
    """One EMF log line: CloudWatch turns it into metrics, no API call from the function."""
    return json.dumps(
        {
            "_aws": {
                "Timestamp": int(time.time() * 1000),
                "CloudWatchMetrics": [
                    {
                        "Namespace": namespace,
                        "Dimensions": [list(dimensions)],
                        "Metrics": [
                            {
                                "Name": name,
                                "Unit": "Seconds" if name.endswith("Seconds") else "Count",
                            }
                            for name in values
                        ],
                    }
                ],
            },
            **dimensions,
            **values,
        }
    )
