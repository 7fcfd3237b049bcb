"""Open-loop load: requests sent at a fixed arrival rate, whatever the server's speed.

Run in its own process (``python -m tests.bench.openloop URL --rate R ...``) so the load
generator and the server under test do not share an event loop. Latency is counted from each
request's *scheduled* send time, so a server that falls behind is charged for the queueing it
causes (no coordinated omission). Prints one JSON line: rate, sent, errors, p50, p99 (ms).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import httpx


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))] if ordered else 0.0


async def run(
    url: str, rate: float, seconds: float, body: object, headers: dict[str, str]
) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=64)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:

        async def one(scheduled: float) -> None:
            nonlocal errors
            try:
                response = await client.post(url, json=body, headers=headers)
                ok = response.status_code in (200, 201)
            except httpx.HTTPError:
                ok = False
            errors += not ok
            latencies.append((time.perf_counter() - scheduled) * 1000)

        start = time.perf_counter() + 0.05
        tasks = []
        for i in range(int(rate * seconds)):
            scheduled = start + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(scheduled)))
        await asyncio.gather(*tasks)
    return {"rate": rate, "sent": len(tasks), "errors": errors,
            "p50": pct(latencies, 50), "p99": pct(latencies, 99)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--rate", type=float, required=True, help="requests per second")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--body", default="{}")
    ap.add_argument("--header", action="append", default=[], help="Name: value")
    args = ap.parse_args()
    headers = dict(h.split(": ", 1) for h in args.header)
    result = asyncio.run(run(args.url, args.rate, args.seconds, json.loads(args.body), headers))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
