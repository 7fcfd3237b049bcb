"""Observability overhead: no-op dispatcher throughput with tracing and metrics on against off.

Run with ``make bench`` (or ``python -m tests.bench.bench_observability``). Three modes, each in
a fresh process (tracing is process-wide) and a fresh database on one server, interleaved
REPEATS times; medians reported:

- ``bare``: the metric hooks of the dispatcher replaced by no-ops, tracing off: the code as if
  it had no instrumentation (the baseline);
- ``off``: as shipped, no OTEL_* endpoint (metrics on, tracing off);
- ``on``: as shipped with ``OTEL_EXPORTER_OTLP_ENDPOINT`` pointing at a local OTLP/HTTP sink:
  a span per pass, per job and claim, per ToDo and per SQL statement, exported in batches;
- ``unsampled``: ``on`` with ``OTEL_TRACES_SAMPLER=always_off``: everything instrumented, no
  span recorded. A sampler ratio r costs about ``unsampled + r * (on - unsampled)``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cpa_scheduler import claim, dispatch, intake, lane, report, store, tracing

from tests.bench.bench_dispatch import _vacuum, server, tenant

MODES = ("bare", "off", "on", "unsampled")


class _Sink(BaseHTTPRequestHandler):
    """Accepts OTLP/HTTP exports and throws them away, counting the bytes."""

    received = 0

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        _Sink.received += len(self.rfile.read(int(self.headers["content-length"])))
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()


def _bare() -> None:
    """Swap the dispatcher's metric hooks for no-ops (the uninstrumented baseline)."""

    def nothing(*args: Any, **kwargs: Any) -> None:
        return None

    bare = types.SimpleNamespace(
        observe_claim=nothing, observe_pass=nothing, observe_finished=nothing,
        observe_run=nothing,
    )  # fmt: skip
    for module in (dispatch, claim, lane, report):  # the dispatcher's parts that observe
        module.metrics = bare  # type: ignore[assignment]


async def child(url: str, mode: str, n: int) -> tuple[float, float]:
    if mode == "bare":
        _bare()
    tracing.setup("bench")
    assert tracing.active() == (mode in ("on", "unsampled")), mode
    db = store.Store(url, max_size=4)
    t = await tenant(db)
    todos = [{"key": f"k{i}", "action": "noop", "target": "cloud"} for i in range(n)]
    async with db.service() as s:
        with tracing.span("bench.submit") as span:
            job = await s.job_create(tenant_id=t, todos=todos)
            await intake.keep_trace(s, job, span)
    await _vacuum(url)
    d = dispatch.Dispatcher(db)
    t0, cpu0 = time.perf_counter(), time.process_time()
    summary = await d.run_pass(600)
    elapsed = time.perf_counter() - t0
    assert summary.done == n, summary
    await db.close()
    tracing.shutdown()  # exports what is left, counted: the export thread's work is overhead
    cpu = time.process_time() - cpu0
    return n / elapsed, 1e6 * cpu / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--todos", type=int, default=5000)
    ap.add_argument("--child", nargs=2, metavar=("URL", "MODE"))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(child(args.child[0], args.child[1], args.todos))))
        return

    srv, stop = server()
    sink = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    results: dict[str, list[float]] = {m: [] for m in MODES}
    cpu: dict[str, list[float]] = {m: [] for m in MODES}
    try:
        for r in range(args.repeats):
            order = MODES[r % len(MODES) :] + MODES[: r % len(MODES)]  # no mode always first
            for mode in order:
                name = srv.create_db(supabase=True)
                env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
                if mode in ("on", "unsampled"):
                    env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{sink.server_port}"
                if mode == "unsampled":
                    env["OTEL_TRACES_SAMPLER"] = "always_off"
                try:
                    done = subprocess.run(
                        [sys.executable, "-m", "tests.bench.bench_observability", "--todos",
                         str(args.todos), "--child", srv.url(name), mode],
                        env=env, capture_output=True, text=True, check=True, timeout=600,
                    )  # fmt: skip
                finally:
                    srv.drop_db(name)
                rate, per_todo = json.loads(done.stdout.strip().splitlines()[-1])
                results[mode].append(rate)
                cpu[mode].append(per_todo)
                print(f"  {mode:9} run {r + 1}: {rate:,.0f} ToDos/s, {per_todo:.0f} µs CPU/ToDo",
                      flush=True)  # fmt: skip
    finally:
        sink.shutdown()
        stop()
    base = statistics.median(results["bare"])
    print(f"\nObservability overhead, 1 job x {args.todos} no-op ToDos, {args.repeats} runs:")
    print("(CPU: the dispatcher process, export thread included, per ToDo; steadier than")
    print(" wall-clock throughput on a shared machine)")
    print("| mode | ToDos/s (runs) | median | vs bare | µs CPU/ToDo (median) | vs bare |")
    print("|---|---|---|---|---|---|")
    cpu_base = statistics.median(cpu["bare"])
    for mode in MODES:
        runs = ", ".join(f"{v:,.0f}" for v in results[mode])
        med, c = statistics.median(results[mode]), statistics.median(cpu[mode])
        print(f"| {mode} | {runs} | {med:,.0f} | {100 * (med / base - 1):+.1f} % "
              f"| {c:.0f} | {100 * (c / cpu_base - 1):+.1f} % |")  # fmt: skip
    print(f"(OTLP bytes exported in 'on' runs: {_Sink.received:,})")


if __name__ == "__main__":
    main()
