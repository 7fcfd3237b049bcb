"""The CLI end to end: serve (embedded PostgreSQL), token, submit, agent, watch.

Every serve started here is stopped, and with it the embedded PostgreSQL it started: the
fixtures count the postmasters under their data directories after.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cpa_scheduler import embedded

from tests.functions.conftest import free_port
from tests.postmasters import postmasters, settled


def cli(*args: str, env: dict[str, str], timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cpa_scheduler.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _env(data_dir: Path, port: int) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "SUPABASE_URL", "SUPABASE_JWT_SECRET")
    }
    env.update(CPA_DATA_DIR=str(data_dir), CPA_API_URL=f"http://127.0.0.1:{port}")
    return env


def _serve(env: dict[str, str]) -> subprocess.Popen[str]:
    """Start serve and wait until it answers /healthz."""
    port = env["CPA_API_URL"].rsplit(":", 1)[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "cpa_scheduler.cli", "serve", "--port", port],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{env['CPA_API_URL']}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise AssertionError(f"serve exited: {proc.stdout.read() if proc.stdout else ''}")
        time.sleep(0.1)
    _stop(proc, signal.SIGKILL)
    raise AssertionError("serve did not answer /healthz in 90 s")


def _stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stdout:
            proc.stdout.close()


@contextlib.contextmanager
def _no_server_left(data_dir: Path) -> Iterator[None]:
    """Fail if a postmaster under data_dir outlives the block; stop it all the same."""
    try:
        yield
    finally:
        left = settled(data_dir, [])
        if left:
            embedded.EmbeddedPostgres(data_dir).stop()
        assert left == [], f"postmasters left running under {data_dir}: {left}"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """One serve (own embedded PostgreSQL) for the module; stopped, with its server, after."""
    data_dir = tmp_path_factory.mktemp("served") / "data"
    env = _env(data_dir, free_port())
    with _no_server_left(data_dir):
        proc = _serve(env)
        try:
            assert httpx.get(f"{env['CPA_API_URL']}/readyz", timeout=5).status_code == 200
            token = cli("token", "--tenant", "demo", "--user", "me", env=env)
            assert token.returncode == 0, token.stderr
            assert token.stdout.count(".") == 2 and "\n" == token.stdout[-1]  # only the token
            env["CPA_TOKEN"] = token.stdout.strip()
            yield env
        finally:
            assert _stop(proc) == 0


def test_serve_stops_the_postgres_it_started_and_leaves_one_it_found(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = _env(data_dir, free_port())
    with _no_server_left(data_dir):
        assert postmasters(data_dir) == []
        # serve starts the embedded server; Ctrl-C stops both.
        proc = _serve(env)
        try:
            assert len(postmasters(data_dir)) == 1
        finally:
            assert _stop(proc, signal.SIGINT) == 0
        assert settled(data_dir, []) == []
        # A command that starts it (token, with no serve running) stops it too.
        assert cli("token", "--tenant", "t", "--user", "u", env=env).returncode == 0
        assert settled(data_dir, []) == []
        # A server that was already running is left running, on SIGTERM as well.
        pg = embedded.EmbeddedPostgres(data_dir)
        pg.start()
        try:
            running = postmasters(data_dir)
            assert len(running) == 1
            assert _stop(_serve(env), signal.SIGTERM) == 0
            assert settled(data_dir, running) == running
        finally:
            pg.stop()
        assert settled(data_dir, []) == []


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


def test_ui_prints_the_signed_in_page_and_the_page_knows_who(served: dict[str, str]) -> None:
    done = cli("ui", "--tenant", "demo", "--user", "me", env=served)
    assert done.returncode == 0, done.stderr
    base = served["CPA_API_URL"]
    url = done.stdout.strip()
    assert url.startswith(f"{base}/ui/#access_token=") and "\n" not in url
    token = url.partition("#access_token=")[2]
    page = httpx.get(f"{base}/ui/", timeout=5)  # the fragment never reaches the server
    assert page.status_code == 200 and "Content-Security-Policy" in page.headers
    me = httpx.get(f"{base}/ui/session", headers={"Authorization": f"Bearer {token}"}, timeout=5)
    assert me.status_code == 200, me.text
    assert me.json()["tenant_name"] == "demo" and me.json()["role"] == "owner"


def test_watch_and_errors(served: dict[str, str]) -> None:
    env = dict(served)
    bad = cli("watch", "00000000-0000-0000-0000-000000000000", env=env)
    assert bad.returncode == 1 and bad.stderr.startswith("error: ")
    env["CPA_TOKEN"] = "garbage"
    assert cli("submit", "Öffne Spotify", env=env).returncode == 1
    env.pop("CPA_TOKEN")
    missing = cli("submit", "Öffne Spotify", env=env)
    assert missing.returncode == 1 and "CPA_TOKEN" in missing.stderr


def _readme_block(heading: str) -> str:
    """The first ```sh block after a README heading, as the README shows it."""
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text("utf-8")
    section = text.split(heading, 1)[1]
    return section.split("```sh\n", 1)[1].split("```", 1)[0]


def test_readme_examples_run_as_written(served: dict[str, str]) -> None:
    env = dict(served)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    # A tenant of its own: another test's agent of tenant demo must not count as online here.
    token = cli("token", "--tenant", "readme", "--user", "reader", env=env)
    env["CPA_TOKEN"] = token.stdout.strip()
    for heading in ("## Usage", "### Timed and recurring work"):
        script = _readme_block(heading)
        if heading == "## Usage":  # the token is there already; the rest runs as written
            script = "\n".join(
                line for line in script.splitlines() if not line.startswith("export ")
            )
        done = subprocess.run(
            ["bash", "-e", "-c", script], env=env, capture_output=True, text=True, timeout=120
        )
        out = done.stdout + done.stderr
        assert done.returncode == 0, out
        assert "Traceback" not in out, out
        if heading == "## Usage":
            assert "Timer: 2 Sekunden sind um." in out and " done" in out
        else:
            assert "Erinnerung: den Tee" in out
            assert "cancelled" in out  # cancel "$JOB"
            assert "Schedule: Scheduled 'erinnere mich an den Müll' at cron '0 8 * * 1'" in out
            assert "30 7 * * 1-5" in out and "deleted" in out
            assert out.count("reminder") >= 1  # list shows the pending reminder


def test_list_into_head_has_no_traceback(served: dict[str, str]) -> None:
    for _ in range(3):
        assert cli("submit", "--detach", "Check my email", env=served).returncode == 0
    env = dict(served)
    done = subprocess.run(
        f"{sys.executable} -m cpa_scheduler.cli list | head -1",
        shell=True, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert len(done.stdout.splitlines()) == 1


def test_bad_environment_variable_is_named() -> None:
    env = dict(os.environ, CPA_RATE_LIMIT="lots")
    bad = cli("migrate", env=env)
    assert bad.returncode == 1
    assert "CPA_RATE_LIMIT='lots'" in bad.stderr and "rate_limit" not in bad.stderr
    assert "Traceback" not in bad.stderr


def test_client_commands_read_no_server_variables(served: dict[str, str]) -> None:
    env = dict(served, CPA_RATE_LIMIT="lots", CPA_DB_TIMEOUT="soon")  # the server's, not theirs
    listed = cli("list", env=env)
    assert listed.returncode == 0, listed.stderr


def test_reference_agent_shows_a_reminder_natively(served: dict[str, str], tmp_path: Path) -> None:
    env = dict(served)
    token = cli("token", "--tenant", "native", "--user", "me", env=env)
    env["CPA_TOKEN"] = token.stdout.strip()
    agent = ["agent", "--once", "--agent-id", "desk", "--sandbox", str(tmp_path)]
    assert cli(*agent, env=env).returncode == 0  # offers reminder.create: now online
    job = cli("submit", "--detach", "Erinnere mich in 10 Minuten an den Tee", env=env)
    assert job.returncode == 0, job.stderr
    shown = cli(*agent, env=env)
    assert "agent: reminder at " in shown.stderr and ": den Tee" in shown.stderr, shown.stderr
    assert cli("cancel", job.stdout.strip(), env=env).returncode == 0
