"""schemathesis against a real `serve`: /openapi.json must match what the API does.

Usage: python scripts/schemathesis_run.py [--max-examples N] [-- extra `st run` options]

Starts `cpa-scheduler serve` in local mode (embedded PostgreSQL in a temporary CPA_DATA_DIR) on
a free port, gets a token with `cpa-scheduler token`, and runs the schemathesis CLI with every
check (status codes, content types and headers as documented, negative data rejected, 405 with
Allow, no 5xx, ...) and a bounded number of examples per operation. Exits with schemathesis's
status: 0 only when there is no failure. `make schemathesis` runs it; CI calls that.

One check is left out: positive_data_acceptance ("a schema-valid request is accepted"). What
JSON Schema cannot say is checked by the API and answered with a 422 that names it: a cron that
never occurs ("0 0 30 2 *"), a time in the past, a cursor the API did not issue, a protocol
message whose type the body schema leaves open.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-examples", type=int, default=25)
    parser.add_argument("extra", nargs="*", help="more options for `st run`")
    args = parser.parse_args()
    data = tempfile.mkdtemp(prefix="cpa-st-")
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env |= {"CPA_DATA_DIR": data, "CPA_RATE_LIMIT": "1000000", "CPA_SCHEDULE_CAP": "100000",
            "CPA_LOG_LEVEL": "ERROR"}  # fmt: skip
    cli = [str(BIN / "cpa-scheduler")]
    serve = subprocess.Popen([*cli, "serve", "--port", str(port)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"{base}/healthz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        else:
            print("serve did not become healthy in 60 s", file=sys.stderr)
            return 1
        token = subprocess.run(
            [*cli, "token", "--tenant", "schemathesis", "--user", "schemathesis"],
            env=env, check=True, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
        command = [
            str(BIN / "st"), "run", f"{base}/openapi.json", "--checks", "all",
            "--max-examples", str(args.max_examples), "--seed", "22",
            "--header", f"Authorization: Bearer {token}",
            "--generation-database", "none", "--suppress-health-check", "all",
            "--request-timeout", "30", "--exclude-checks", "positive_data_acceptance",
            *args.extra,
        ]  # fmt: skip
        return subprocess.run(command, env=env).returncode
    finally:
        serve.terminate()
        try:
            serve.wait(30)
        except subprocess.TimeoutExpired:
            serve.kill()
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
