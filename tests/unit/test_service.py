"""The composition root: parts built from the settings, on first use, once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cpa_scheduler import auth, ratelimit, service, settings, store


def services(tmp_path: Path, **overrides: object) -> service.Services:
    config = settings.Settings(
        database_url="postgresql://unused", data_dir=tmp_path, supabase_jwt_secret="s" * 40,
        tenant_running_cap=7, retention_days=3, **overrides,
    )  # fmt: skip
    return service.build_services(config)  # with DATABASE_URL: nothing started, nothing opened


def test_parts_come_from_the_settings_once(tmp_path: Path) -> None:
    built = services(tmp_path, openai_base_url="http://127.0.0.1:9/v1")
    assert isinstance(built.store, store.Store) and built.store.url == "postgresql://unused"
    assert isinstance(built.limiter, ratelimit.PostgresLimiter)
    assert built.verifier is built.verifier and built.registry is built.registry
    assert "plan" in built.registry.actions()  # an LLM is configured
    dispatcher = built.dispatcher(concurrency=5)
    assert dispatcher.store is built.store and dispatcher.registry is built.registry
    assert (dispatcher.concurrency, dispatcher.tenant_cap, dispatcher.retention_days) == (5, 7, 3)


def test_a_host_may_hand_in_its_own_parts(tmp_path: Path) -> None:
    verifier = auth.Verifier(hs256_secret="t" * 40)
    own = service.Services(services(tmp_path).config, store.Store("postgresql://x"),
                           verifier=verifier)  # fmt: skip
    assert own.verifier is verifier


def test_each_lambda_function_imports_only_what_it_runs() -> None:
    code = "import sys, functions.{fn}; print(sorted(m for m in {mods!r} if m in sys.modules))"
    api_mods = ("cpa_scheduler.planner", "cpa_scheduler.dispatch", "cpa_scheduler.llm", "a2a")
    dispatcher_mods = ("cpa_scheduler.auth", "cpa_scheduler.ratelimit", "jwt", "fastapi")
    for fn, mods in (("api", api_mods), ("dispatcher", dispatcher_mods)):
        done = subprocess.run(
            [sys.executable, "-c", code.format(fn=fn, mods=mods)],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        assert done.stdout.strip() == "[]", (fn, done.stdout)
