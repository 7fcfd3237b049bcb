"""POST /v1/jobs over HTTP, the API alone under uvicorn, single client, sampled with py-spy
(``pip install py-spy``; not a project dependency). Prints the single-client p50 and the
functions with the most samples (self and total) in the server process.

    python -m tests.bench.profile_http [--seconds 8]
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import httpx
import psycopg
from cpa_scheduler import auth

from tests.bench.bench_api import GRAPH, ISSUER, SECRET, free_port, start
from tests.bench.bench_dispatch import server


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--top", type=int, default=40, help="inclusive entries to print")
    ap.add_argument(
        "--steady",
        type=int,
        default=0,
        help="first create N jobs, then ANALYZE (a database past its first minutes)",
    )
    args = ap.parse_args()
    srv, stop = server()
    name = srv.create_db(supabase=True)
    url = srv.url(name)
    tenant, user = uuid.uuid4(), uuid.uuid4()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("insert into auth.users (id) values (%s)", (user,))
        conn.execute("insert into public.tenants (id, name) values (%s, 'p')", (tenant,))
        conn.execute("insert into public.memberships (tenant_id, user_id) values (%s, %s)",
                     (tenant, user))  # fmt: skip
    token = auth.mint(SECRET, user, issuer=ISSUER)
    env = {**os.environ, "DATABASE_URL": url, "SUPABASE_JWT_SECRET": SECRET,
           "SUPABASE_URL": ISSUER.removesuffix("/auth/v1"), "CPA_RATE_LIMIT": "1000000000"}  # fmt: skip
    port = free_port()
    proc = start([sys.executable, "-m", "uvicorn", "cpa_scheduler.api:app", "--port", str(port),
                  "--log-level", "warning", "--no-access-log"], env, f"http://127.0.0.1:{port}")  # fmt: skip
    out = tempfile.mktemp(suffix=".txt")
    lat: list[float] = []
    try:
        target = f"http://127.0.0.1:{port}/v1/jobs"
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(timeout=30) as c:
            for _ in range(50 + args.steady):
                c.post(target, json={"graph": GRAPH}, headers=headers)
            if args.steady:
                with psycopg.connect(url, autocommit=True) as conn:
                    conn.execute("analyze")
            spy = subprocess.Popen(
                [os.path.join(os.path.dirname(sys.executable), "py-spy"), "record", "-p",
                 str(proc.pid), "-d", str(int(args.seconds)), "-r", "500", "-f", "raw", "-o", out],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(1.0)
            done = threading.Event()
            deadline = time.monotonic() + args.seconds - 2
            while time.monotonic() < deadline:
                t0 = time.perf_counter()
                r = c.post(target, json={"graph": GRAPH}, headers=headers)
                assert r.status_code == 201, r.text
                lat.append((time.perf_counter() - t0) * 1000)
            done.set()
            spy.wait(60)
    finally:
        proc.terminate()
        proc.wait(30)
        srv.drop_db(name)
        stop()
    print(f"single client while sampled: n={len(lat)} p50 {statistics.median(lat):.2f} ms")
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    with open(out) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            n = int(count)
            samples += n
            frames = stack.split(";")
            own[frames[-1]] += n
            for fr in set(frames):
                total[fr] += n
    print(f"{samples} samples of the server process (non-idle)")
    print("\nself:")
    for fr, n in own.most_common(15):
        print(f"  {100 * n / samples:5.1f}%  {fr[:150]}")
    print("\ntotal (inclusive):")
    for fr, n in total.most_common(args.top):
        print(f"  {100 * n / samples:5.1f}%  {fr[:150]}")


if __name__ == "__main__":
    main()
