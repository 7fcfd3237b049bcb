"""Jobs page benchmark: a 1,000-ToDo job in Debian's chromium (Playwright) against `serve`.

Per repeat: a fresh 1,000-ToDo job held by ``run_at`` a few seconds ahead, so the page draws it
pending; then, while serve's dispatcher runs it, the page's frames and draws. Figures are the
page's own marks (ms since navigation): the job's JSON in hand, the graph drawn; then the
longest gap between frames, the median and longest draw, and the ToDos finished per second
while it ran. Run: ``python -m tests.bench.bench_ui [--repeats 5]`` (needs /usr/bin/chromium).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import sys
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from cpa_scheduler import auth, store
from playwright.async_api import async_playwright

from tests.bench.bench_api import free_port, start
from tests.bench.bench_dispatch import server

SECRET = "bench-secret-bench-secret-bench-secret-0123456789"
ISSUER = "https://bench.supabase.co/auth/v1"
CHROMIUM = os.environ.get("CPA_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]  # fmt: skip
PROBE = """() => new Promise((resolve) => {
    const done = () => document.querySelectorAll('g.node[data-status="done"]').length;
    let start = null, last = 0, worst = 0, first = 0;
    function tick(now) {
        if (start === null && done() > 0) { start = last = now; first = done(); }
        if (start !== null) { worst = Math.max(worst, now - last); last = now; }
        if (start === null || (now - start < 5000 && done() < 1000)) requestAnimationFrame(tick);
        else {
            const draws = performance.getEntriesByName("cpa:draw").filter((e) => e.startTime >= start)
                .map((e) => e.duration).sort((a, b) => a - b);
            resolve({worst, seconds: (now - start) / 1000, finished: done() - first,
                     drawMedian: draws[draws.length >> 1] || 0, drawMax: draws.at(-1) || 0});
        }
    }
    requestAnimationFrame(tick);
})"""


def graph(n: int, seed: int) -> list[dict[str, Any]]:
    rnd = random.Random(seed)
    todos = []
    for i in range(n):
        pool = list(range(max(0, i - 40), i))
        deps = rnd.sample(pool, min(len(pool), rnd.choice([1, 1, 2, 3]))) if i >= 8 else []
        todos.append({"key": f"t{i:04d}", "action": "noop", "target": "cloud", "params": {},
                      "depends_on": [f"t{d:04d}" for d in deps]})  # fmt: skip
    return todos


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    srv, stop = server()
    url = srv.url(srv.create_db(supabase=True))
    tenant, user = uuid.uuid4(), uuid.uuid4()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("insert into auth.users (id) values (%s)", (user,))
        conn.execute("insert into public.tenants (id, name) values (%s, 'bench')", (tenant,))
        conn.execute(
            "insert into public.memberships (tenant_id, user_id) values (%s, %s)", (tenant, user)
        )
    token = auth.mint(SECRET, user, issuer=ISSUER)
    claims = auth.Verifier(hs256_secret=SECRET, issuer=ISSUER).verify(token).for_database()
    port = free_port()
    env = {**os.environ, "DATABASE_URL": url, "SUPABASE_JWT_SECRET": SECRET,
           "SUPABASE_URL": ISSUER.removesuffix("/auth/v1"), "CPA_LOG_LEVEL": "WARNING"}  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    proc = start(
        [sys.executable, "-m", "cpa_scheduler.cli", "serve", "--port", str(port)], env, base
    )
    db = store.Store(url, max_size=2)
    rows: list[dict[str, float]] = []
    try:
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            for i in range(args.repeats):
                async with db.user(claims) as s:
                    job = await s.job_create(
                        tenant_id=tenant, todos=graph(1000, i), request=f"bench {i}",
                        run_at=datetime.now(UTC) + timedelta(seconds=6),
                    )  # fmt: skip
                ctx = await browser.new_context(viewport={"width": 1400, "height": 900})
                page = await ctx.new_page()
                await page.goto(f"{base}/ui/jobs/{job.id}#access_token={token}")
                await page.wait_for_function("() => document.body.dataset.drawnAt", timeout=30_000)
                marks = await page.evaluate(
                    "[+document.body.dataset.fetchedAt, +document.body.dataset.drawnAt,"
                    " performance.getEntriesByName('cpa:graph-build')[0].duration]"
                )
                run = await asyncio.wait_for(page.evaluate(PROBE), 60)
                rows.append({"in_hand": marks[0], "drawn": marks[1], "render": marks[1] - marks[0],
                             "graph_build": marks[2],
                             "worst_gap": run["worst"], "draw_median": run["drawMedian"],
                             "draw_max": run["drawMax"],
                             "todos_per_s": run["finished"] / run["seconds"]})  # fmt: skip
                print({k: round(v) for k, v in rows[-1].items()}, flush=True)
                await ctx.close()
            await browser.close()
    finally:
        await db.close()
        proc.terminate()
        proc.wait(30)
        stop()
    print(f"\n{platform.node()}, load {os.getloadavg()[0]:.1f}; medians of {len(rows)} "
          "(min-max), ms unless named:")  # fmt: skip
    for key in rows[0]:
        values = [r[key] for r in rows]
        print(f"  {key:12} {statistics.median(values):7.0f} ({min(values):.0f}-{max(values):.0f})")


if __name__ == "__main__":
    asyncio.run(main())
