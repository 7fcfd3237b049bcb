"""This checkout's dispatcher throughput against another revision's, in the same run.

Usage: python -m tests.bench.bench_revisions --other PATH [--repeats 5] [--n 10000]

PATH is a checkout of the other revision with its own ``.venv`` (``git worktree add PATH REV &&
make -C PATH install``). Each repeat runs both checkouts in turn (A B, then B A, alternating):
each drains 1 job x n no-op ToDos and 100 x (n / 100)-ToDo chains with its own code and its own
migrations, in fresh databases on one server (BENCH_DATABASE_URL, else the machine's PostgreSQL
on 127.0.0.1:5432). It prints every figure, the medians, and the ratio this / other of each
repeat's pair, which holds when the machine's speed drifts; ``*_cpu_us`` is the benchmark
process's CPU per ToDo (the dispatcher's Python and driver, setup included), steadier than
throughput on a loaded machine; ``latency_*`` is dependency done -> dependent running (100
5-ToDo chains, the executors' clock, bench_dispatch.latency). Used for "behaviour must not change
and throughput stays within noise" checks of refactors.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Only names both revisions have: ours_wide, ours_chains, latency and server of bench_dispatch.
SNIPPET = """
import asyncio, json, sys, time
from tests.bench import bench_dispatch as b
n = int(sys.argv[1])
async def main():
    srv, stop = b.server()
    try:
        t0 = time.process_time()
        wide = await b.ours_wide(srv, n)
        t1 = time.process_time()
        chains = await b.ours_chains(srv, 100, n // 100)
        t2 = time.process_time()
        lat = sorted(await b.latency(srv))
    finally:
        stop()
    # The dispatcher's own CPU (this process: Python and its driver, not the server) per
    # ToDo, in microseconds; the machine's load moves it far less than the wall clock.
    print(json.dumps({"wide": wide, "chains": chains, "wide_cpu_us": (t1 - t0) / n * 1e6,
                      "chains_cpu_us": (t2 - t1) / n * 1e6,
                      "latency_p50_ms": lat[len(lat) // 2],
                      "latency_p99_ms": lat[min(len(lat) - 1, round(len(lat) * 0.99))]}))
asyncio.run(main())
"""


def run(checkout: Path, n: int, url: str) -> dict[str, float]:
    env = {**os.environ, "BENCH_DATABASE_URL": url}
    out = subprocess.run(
        [str(checkout / ".venv" / "bin" / "python"), "-c", SNIPPET, str(n)],
        cwd=checkout, env=env, check=True, capture_output=True, text=True,
    )  # fmt: skip
    figures: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return figures


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--other", type=Path, required=True, help="checkout of the other revision")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--n", type=int, default=10_000)
    args = ap.parse_args()
    url = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    if not (args.other / ".venv" / "bin" / "python").exists():
        sys.exit(f"{args.other} has no .venv; run: make -C {args.other} install")
    sides = {"this": ROOT, "other": args.other.resolve()}
    results: dict[str, list[dict[str, float]]] = {"this": [], "other": []}
    for rep in range(args.repeats):
        order = ["this", "other"] if rep % 2 == 0 else ["other", "this"]
        for side in order:
            figures = run(sides[side], args.n, url)
            results[side].append(figures)
            print(f"repeat {rep + 1} {side}: " + ", ".join(f"{k} {v:,.2f}" for k, v in figures.items()), flush=True)  # fmt: skip
    print(f"\nthis = {ROOT}, other = {sides['other']}")
    print("| figure | this (runs) | other (runs) | median this / other | ratio per pair |")
    print("|---|---|---|---|---|")
    for key in (
        "wide",
        "chains",
        "wide_cpu_us",
        "chains_cpu_us",
        "latency_p50_ms",
        "latency_p99_ms",
    ):
        this = [r[key] for r in results["this"]]
        other = [r[key] for r in results["other"]]
        pairs = [a / b for a, b in zip(this, other, strict=True)]
        digits = 2 if key.startswith("latency") else 0
        print(
            f"| {key} | {', '.join(f'{v:,.{digits}f}' for v in this)} | "
            f"{', '.join(f'{v:,.{digits}f}' for v in other)} | "
            f"{statistics.median(this) / statistics.median(other):.2f} | "
            f"{', '.join(f'{p:.2f}' for p in pairs)} (median {statistics.median(pairs):.2f}) |"
        )


if __name__ == "__main__":
    main()
