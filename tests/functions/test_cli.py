"""The CLI commands implemented so far, run as a user would."""

from __future__ import annotations

import json
import subprocess
import sys

import psycopg
import pytest
from cpa_scheduler import cli, console, host


def test_route_shows_intent_and_plan(capsys: pytest.CaptureFixture[str]) -> None:
    text = "Erinnere mich morgen um 9 an den Zahnarzt"
    assert cli.main(["route", text, "--time-zone", "Europe/Berlin"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["intent"] == "reminder"
    # A cloud notification at the resolved time: it fires with no desktop agent online.
    remind = out["plan"][0]
    assert remind["action"] == "notify"
    assert remind["params"] == {"title": "Erinnerung", "message": "den Zahnarzt"}
    assert remind["run_at"].endswith("T09:00:00+01:00") or remind["run_at"].endswith(
        "T09:00:00+02:00"
    )


def test_route_unknown(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["route", "Bestelle eine Pizza"]) == 0
    assert json.loads(capsys.readouterr().out)["intent"] == "unknown"


def test_migrate_and_dispatch_once_in_a_subprocess(db_url: str) -> None:
    env = {"DATABASE_URL": db_url, "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "cpa_scheduler.cli", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    with psycopg.connect(db_url) as conn:
        n = conn.execute("select count(*) from supabase_migrations.schema_migrations").fetchone()
        assert n is not None and n[0] >= 5
    done = subprocess.run(
        [sys.executable, "-m", "cpa_scheduler.cli", "dispatch", "--once", "--budget", "5"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["claimed"] == 0


def test_bad_database_url_is_a_clear_error() -> None:
    env = {"DATABASE_URL": "postgresql://nobody@127.0.0.1:1/x", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "cpa_scheduler.cli", "dispatch", "--once"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    # The dispatcher logs the failed claim (a warning), then the command exits with the error.
    assert "\nerror: The database is unavailable: connection failed" in done.stderr, done.stderr
    assert "port 1" in done.stderr


def test_top_level_help_is_plain_text(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "serve runs the API" in out
    for markup in ("``", ":func:", ":class:", ":meth:"):
        assert markup not in out


def test_a_cron_macro_and_a_worded_run_at_get_clear_answers(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CPA_TOKEN", raising=False)
    assert cli.main(["schedule", "add", "@daily", "check my email"]) != 0
    err = capsys.readouterr().err
    assert "'0 0 * * *' for @daily" in err and "at least 9 characters" not in err
    assert console._run_at("2026-12-01T08:00:00+01:00", "UTC") == "2026-12-01T08:00:00+01:00"
    tomorrow = console._run_at("tomorrow at 9am", "Europe/Berlin")
    assert tomorrow is not None and "T09:00:00+0" in tomorrow
    assert cli.main(["submit", "--run-at", "next blursday", "check my email"]) != 0
    err = capsys.readouterr().err
    assert "--run-at 'next blursday' is not a time" in err and "RFC 3339" in err


def test_a_second_serve_on_a_busy_port_says_so_in_one_line() -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "cpa_scheduler.cli", "serve", "--port", str(port)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "--port" in lines[0], lines
    assert "Traceback" not in done.stderr and "CPA Scheduler on" not in done.stderr


def test_the_seed_tenant_is_the_one_token_makes() -> None:
    from pathlib import Path

    seed = (Path(__file__).resolve().parents[2] / "supabase" / "seed.sql").read_text()
    assert f"'{host._ident('demo', 'tenant')}', 'demo'" in seed
