"""Progress-event cost, step by step: the 1 x 10,000 no-op drain per migration prefix.

Each variant is the schema as it stood after a given migration (the steps of issue 15 item 1 are
separate migration files), drained with the same ``Dispatcher`` defaults on a fresh database.
Variants run interleaved, REPEATS times; medians and ranges are printed.

    python -m tests.bench.bench_event_steps --repeats 5
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
from pathlib import Path

from cpa_scheduler import migration, store
from psycopg.conninfo import conninfo_to_dict

from tests.bench.bench_dispatch import ROOT, Server, _vacuum, create_jobs, drain, server, tenant

# (label, the last migration version the variant includes)
STEPS = [
    ("before (main)", "20261127000400"),
    ("+ no work for 0-row statements", "20261127000700"),
    ("+ no foreign key on job_events", "20261127000710"),
    ("all migrations", "99999999999999"),
]


def prefix_dir(upto: str) -> Path:
    """A copy of supabase/ whose migrations stop at version ``upto``."""
    tmp = Path(tempfile.mkdtemp(prefix="cpa-steps-"))
    shutil.copytree(ROOT / "supabase" / "local", tmp / "local")
    (tmp / "migrations").mkdir()
    for m in migration.migrations():
        if m.version <= upto:
            shutil.copy(ROOT / "supabase" / "migrations" / f"{m.version}_{m.name}.sql",
                        tmp / "migrations")  # fmt: skip
    return tmp


async def one(srv: Server, folder: Path, n: int) -> float:
    name = srv.create_db(supabase=False)
    try:
        url = srv.url(name)
        admin = srv.url(name, user=str(conninfo_to_dict(srv.admin_url)["user"]))
        migration.bootstrap(admin, folder)
        migration.apply(url, folder)
        db = store.Store(url, max_size=4)
        t = await tenant(db)
        await create_jobs(
            db, t, [[{"key": f"k{i}", "action": "noop", "target": "cloud"} for i in range(n)]]
        )
        await _vacuum(url)
        elapsed, summary = await drain(db)
        assert summary.done == n, summary
        await db.close()
        return n / elapsed
    finally:
        srv.drop_db(name)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--n", type=int, default=10_000)
    args = ap.parse_args()
    srv, stop = server()
    folders = [(label, prefix_dir(upto)) for label, upto in STEPS]
    figures: dict[str, list[float]] = {label: [] for label, _ in STEPS}
    try:
        for rep in range(args.repeats):
            # Rotate the order each repeat so no variant always runs first.
            order = folders[rep % len(folders) :] + folders[: rep % len(folders)]
            for label, folder in order:
                figures[label].append(await one(srv, folder, args.n))
                print(f"  {label}: {figures[label][-1]:,.0f}", flush=True)
    finally:
        stop()
    print("| variant | ToDos/s (runs) | median | range | vs before |\n|---|---|---|---|---|")
    base = statistics.median(figures[STEPS[0][0]])
    for label, values in figures.items():
        med = statistics.median(values)
        runs = ", ".join(f"{v:,.0f}" for v in values)
        print(f"| {label} | {runs} | {med:,.0f} | {min(values):,.0f}–{max(values):,.0f}"
              f" | {med / base:.2f}× |")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
