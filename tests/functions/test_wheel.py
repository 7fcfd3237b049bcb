"""The built wheel, installed into a fresh virtual environment and used from an empty folder.

This is how Railway, a desktop embedding the client, or anyone running ``pip install`` gets the
package: no checkout beside it, so migrations and the bootstrap must come from the wheel.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from cpa_scheduler import embedded, migration

from tests.conftest import Server
from tests.functions.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (found,) = out.glob("cpa_scheduler-*.whl")
    return found


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True, timeout=120)
    done = subprocess.run(
        [str(where / "bin" / "python"), "-m", "pip", "install", "-q", f"{wheel}[local]"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return where


def test_wheel_installs_one_top_level_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"cpa_scheduler", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1]
                   + ".dist-info"}  # fmt: skip
    shipped = sorted(n.rsplit("/", 1)[1] for n in names if "/supabase/migrations/" in n)
    assert shipped == sorted(p.name for p in (ROOT / "supabase" / "migrations").glob("*.sql"))
    assert "cpa_scheduler/supabase/local/bootstrap.sql" in names
    # The jobs page: every file of shared/cpa_scheduler/ui, nothing built elsewhere.
    page = sorted(n.rsplit("/", 1)[1] for n in names if n.startswith("cpa_scheduler/ui/"))
    assert page == sorted(p.name for p in (ROOT / "shared" / "cpa_scheduler" / "ui").iterdir())


@pytest.fixture
def empty_dir(tmp_path: Path) -> Path:
    where = tmp_path / "empty"
    where.mkdir()
    return where


def _env(**extra: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("CPA_", "DATABASE_URL"))}
    keep = {k: v for k, v in keep.items() if k not in ("SUPABASE_URL", "SUPABASE_JWT_SECRET")}
    keep.pop("PYTHONPATH", None)
    return {**keep, **extra}


@pytest.fixture
def served(venv: Path, empty_dir: Path, tmp_path: Path) -> Iterator[dict[str, str]]:
    port = free_port()
    env = _env(CPA_DATA_DIR=str(tmp_path / "data"), CPA_API_URL=f"http://127.0.0.1:{port}")
    proc = subprocess.Popen(
        [str(venv / "bin" / "cpa-scheduler"), "serve", "--port", str(port)],
        cwd=empty_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{env['CPA_API_URL']}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.2)
        else:
            raise AssertionError("serve from the installed wheel did not answer /healthz")
        yield env
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        if proc.stdout:
            proc.stdout.close()
        embedded.EmbeddedPostgres(Path(env["CPA_DATA_DIR"])).stop()


def test_installed_wheel_serves_mints_and_migrates(
    venv: Path, empty_dir: Path, served: dict[str, str], pg_server: Server, template_db: str
) -> None:
    cli = str(venv / "bin" / "cpa-scheduler")
    token = subprocess.run(
        [cli, "token", "--tenant", "demo", "--user", "me"],
        cwd=empty_dir, env=served, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert token.returncode == 0, token.stderr
    jobs = httpx.get(
        f"{served['CPA_API_URL']}/v1/jobs",
        headers={"Authorization": f"Bearer {token.stdout.strip()}"},
        timeout=10,
    )
    assert jobs.status_code == 200 and jobs.json()["jobs"] == []
    # The installed wheel serves the jobs page from its package data.
    script = httpx.get(f"{served['CPA_API_URL']}/ui/assets/graph.js", timeout=10)
    assert script.status_code == 200 and "export class GraphView" in script.text

    # A fresh database elsewhere (DATABASE_URL), prepared as a hosted project comes (the
    # template_db fixture has created the cluster-wide roles).
    name = f"cpa_wheel_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_server.admin("postgres"), autocommit=True) as conn:
        conn.execute(f'create database "{name}" owner "{pg_server.app_user}"')
    try:
        migration.bootstrap(pg_server.admin(name))
        migrate = subprocess.run(
            [cli, "migrate"], cwd=empty_dir, env=_env(DATABASE_URL=pg_server.url(name)),
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert migrate.returncode == 0, migrate.stderr
        with psycopg.connect(pg_server.url(name)) as conn:
            applied = conn.execute(
                "select count(*) from supabase_migrations.schema_migrations"
            ).fetchone()
        assert applied is not None
        assert applied[0] == len(list((ROOT / "supabase" / "migrations").glob("*.sql")))
    finally:
        with psycopg.connect(pg_server.admin("postgres"), autocommit=True) as conn:
            conn.execute(f'drop database if exists "{name}" with (force)')
