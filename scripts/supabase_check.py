"""Apply the migrations with the real Supabase CLI and run its security advisors.

Starts a throw-away embedded PostgreSQL, applies the local bootstrap (what a hosted project
already has), then runs `supabase db push` and `supabase db advisors --type security` against
it. Fails on any warn- or error-level finding. Needs Node's npx (the CLI comes from npm).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from cpa_scheduler import embedded, migration

CLI = ["npx", "--yes", "supabase@2.117.0"]
ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="cpa-supabase-") as tmp:
        pg = embedded.EmbeddedPostgres(Path(tmp), durable=False)
        pg.start()
        try:
            migration.bootstrap(pg.url(user=embedded.SUPERUSER))
            url = pg.url() + "?sslmode=disable"
            steps = [
                [*CLI, "db", "push", "--db-url", url, "--include-seed", "--yes"],
                [*CLI, "migration", "list", "--db-url", url],
                [*CLI, "db", "advisors", "--db-url", url, "--type", "security",
                 "--level", "warn", "--fail-on", "warn"],
            ]  # fmt: skip
            for step in steps:
                print("$", " ".join(step[3:]), flush=True)
                done = subprocess.run(step, cwd=ROOT, check=False)
                if done.returncode != 0:
                    print(f"supabase-check: '{' '.join(step[3:6])}' failed", file=sys.stderr)
                    return done.returncode
        finally:
            pg.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
