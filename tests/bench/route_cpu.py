"""The Python CPU of one ``POST /v1/jobs`` in process, the store stubbed: what a route-level
device (a shortcut past FastAPI, the token cache) buys, free of the database and the network.

    python -m tests.bench.route_cpu [--other FOLDER ...] [--rounds 7] [--n 2000]

Each FOLDER holds another version's ``shared/`` (``git archive REV | tar -x -C FOLDER``). Every
round runs this checkout and each FOLDER in turn (the order rotates), each in a subprocess of
its own: N requests through ``httpx.ASGITransport`` after a warm-up, timed by the thread's CPU
clock (``time.thread_time``; the app runs in this thread), so the machine's load moves it far
less than wall time. Prints each round's microseconds per request, the medians and the ratio of
each FOLDER to this checkout per round. The store's ``submit`` answers a fixed job at once;
everything else (the app, its middleware, the token's verification, the body model, the
one-call planning of the request) is the real code.
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

SNIPPET = """
import asyncio, json, sys, time, uuid
import httpx
from cpa_scheduler import api, auth, service, settings, store
from tests.bench.bench_api import GRAPH, ISSUER, SECRET

ANSWER = json.dumps({"id": str(uuid.uuid4()), "tenant_id": str(uuid.uuid4()), "todos": []})

class Stub(store.Store):
    async def submit(self, claims, call):
        return ANSWER

async def main(n):
    cfg = settings.Settings(database_url="postgresql://stub@127.0.0.1:1/stub",
                            supabase_jwt_secret=SECRET,
                            supabase_url=ISSUER.removesuffix("/auth/v1"), rate_limit=10**9)
    app = api.create_app(service.Services(cfg, Stub(cfg.database_url)))
    headers = {"Authorization": "Bearer " + auth.mint(SECRET, uuid.uuid4(), issuer=ISSUER)}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://t") as client:
        async def post():
            r = await client.post("/v1/jobs", json={"graph": GRAPH}, headers=headers)
            assert r.status_code == 201, r.text
        for _ in range(300):
            await post()
        t0 = time.thread_time()
        for _ in range(n):
            await post()
        print(json.dumps({"us": (time.thread_time() - t0) / n * 1e6}))

asyncio.run(main(int(sys.argv[1])))
"""


def run(shared: Path, n: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(shared), "PYTHONDONTWRITEBYTECODE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", SNIPPET, str(n)],
        cwd=ROOT, env=env, check=True, capture_output=True, text=True,
    )  # fmt: skip
    figure: float = json.loads(out.stdout.strip().splitlines()[-1])["us"]
    return figure


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--other", type=Path, action="append", default=[], help="another shared/")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--n", type=int, default=2000)
    args = ap.parse_args()
    sides = {"this": ROOT / "shared", **{str(p): p.resolve() / "shared" for p in args.other}}
    figures: dict[str, list[float]] = {k: [] for k in sides}
    names = list(sides)
    for rnd in range(args.rounds):
        order = names[rnd % len(names) :] + names[: rnd % len(names)]
        for name in order:
            figures[name].append(run(sides[name], args.n))
        print(f"round {rnd + 1}: " + ", ".join(f"{k} {v[-1]:.0f} us" for k, v in figures.items()))
    for name, values in figures.items():
        pairs = [v / t for v, t in zip(values, figures["this"], strict=True)]
        print(
            f"{name}: median {statistics.median(values):.0f} us "
            f"({min(values):.0f}-{max(values):.0f}); / this per round: "
            f"{', '.join(f'{p:.2f}' for p in pairs)} (median {statistics.median(pairs):.2f})"
        )


if __name__ == "__main__":
    main()
