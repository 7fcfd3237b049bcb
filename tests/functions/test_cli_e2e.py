"""The CLI end to end: serve (embedded PostgreSQL), token, submit, agent, watch."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.functions.conftest import free_port


def cli(*args: str, env: dict[str, str], timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cpa_scheduler.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def served(tmp_path: Path) -> Iterator[dict[str, str]]:
    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "SUPABASE_URL", "SUPABASE_JWT_SECRET")
    }
    env.update(CPA_DATA_DIR=str(tmp_path / "data"), CPA_API_URL=f"http://127.0.0.1:{port}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cpa_scheduler.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{env['CPA_API_URL']}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise AssertionError(f"serve exited: {proc.stdout.read() if proc.stdout else ''}")
            time.sleep(0.2)
        else:
            raise AssertionError("serve did not answer /healthz in 90 s")
        assert httpx.get(f"{env['CPA_API_URL']}/readyz", timeout=5).status_code == 200
        token = cli("token", "--tenant", "demo", "--user", "me", env=env)
        assert token.returncode == 0, token.stderr
        assert token.stdout.count(".") == 2 and "\n" == token.stdout[-1]  # only the token
        env["CPA_TOKEN"] = token.stdout.strip()
        yield env
    finally:
        proc.terminate()
        proc.wait(30)
        if proc.stdout:
            proc.stdout.close()


def test_submit_a_german_request_to_done(served: dict[str, str]) -> None:
    done = cli("submit", "Stell einen Timer auf 1 Sekunden", env=served)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "done" in done.stdout and "Timer" in done.stdout  # the notification was shown
    unknown = cli("submit", "Bestelle eine Pizza", env=served)
    assert unknown.returncode == 1 and "set OPENAI_API_KEY or OPENAI_BASE_URL" in unknown.stderr


def test_agent_completes_a_desktop_todo(served: dict[str, str], tmp_path: Path) -> None:
    submit = subprocess.Popen(
        [sys.executable, "-m", "cpa_scheduler.cli", "submit", 'Schreibe "Hallo Welt" in gruss.txt'],
        env=served,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    sandbox = tmp_path / "sandbox"
    handled = 0
    for _ in range(20):
        agent = cli(
            "agent", "--once", "--agent-id", "laptop", "--sandbox", str(sandbox), env=served
        )
        assert agent.returncode == 0, agent.stderr
        handled += agent.stderr.count("-> done")
        if handled:
            break
        time.sleep(0.3)
    out, err = submit.communicate(timeout=60)
    assert submit.returncode == 0, out + err
    assert (sandbox / "gruss.txt").read_text() == "Hallo Welt"


def test_watch_and_errors(served: dict[str, str]) -> None:
    env = dict(served)
    bad = cli("watch", "00000000-0000-0000-0000-000000000000", env=env)
    assert bad.returncode == 1 and bad.stderr.startswith("error: ")
    env["CPA_TOKEN"] = "garbage"
    assert cli("submit", "Öffne Spotify", env=env).returncode == 1
    env.pop("CPA_TOKEN")
    missing = cli("submit", "Öffne Spotify", env=env)
    assert missing.returncode == 1 and "CPA_TOKEN" in missing.stderr
