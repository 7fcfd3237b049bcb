"""`.railway/railway.py` (Railway IaC) renders offline and agrees with the Config as Code files."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
from railway_sdk import create_railway_context

ROOT = Path(__file__).parents[2]
CONFIG_AS_CODE = {
    "api": ROOT / "railway.json",
    "dispatcher": ROOT / "infra" / "railway" / "dispatcher.json",
}


def render(environ: dict[str, str] | None = None) -> dict[str, Any]:
    spec = importlib.util.spec_from_file_location("railway_iac", ROOT / ".railway" / "railway.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    with pytest.MonkeyPatch.context() as mp:
        for name in ("CPA_RAILWAY_REPO", "CPA_RAILWAY_BRANCH"):
            mp.delenv(name, raising=False)
        for name, value in (environ or {}).items():
            mp.setenv(name, value)
        spec.loader.exec_module(module)
        graph: dict[str, Any] = module.main(
            create_railway_context(environment="production", command="plan")
        ).to_graph()
    json.dumps(graph)  # a plain, serialisable graph
    return graph


def services(graph: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in graph["resources"] if r["type"] == "service"}


def test_two_services_api_and_dispatcher() -> None:
    graph = render()
    assert graph["name"] == "cpa-scheduler"
    assert set(services(graph)) == {"api", "dispatcher"}


@pytest.mark.parametrize("name", sorted(CONFIG_AS_CODE))
def test_agrees_with_config_as_code(name: str) -> None:
    node = services(render())[name]
    config = json.loads(CONFIG_AS_CODE[name].read_text())
    # Start command, pre-deploy, health check, restart policy, replicas, draining: all of deploy.
    assert node["deploy"] == config["deploy"]
    assert node["build"] == config["build"]


def test_the_api_migrates_first_and_is_checked_on_readyz() -> None:
    api = services(render())["api"]["deploy"]
    assert api["preDeployCommand"] == ["cpa-scheduler migrate"]
    assert api["startCommand"].startswith("uvicorn cpa_scheduler.api:app ")
    assert "--port $PORT" in api["startCommand"]
    assert api["healthcheckPath"] == "/readyz"
    worker = services(render())["dispatcher"]["deploy"]
    assert worker["startCommand"] == "cpa-scheduler dispatch"
    assert worker["restartPolicyType"] == "ALWAYS" and "healthcheckPath" not in worker


def test_source_is_the_named_repository_or_none() -> None:
    assert all("source" not in s for s in services(render()).values())
    named = services(render({"CPA_RAILWAY_REPO": "acme/cpa-scheduler"}))
    for node in named.values():
        assert node["source"] == {"type": "github", "repo": "acme/cpa-scheduler", "branch": "main"}
        assert node["kind"] == "github"


def test_no_secret_values_in_the_graph() -> None:
    assert all("variables" not in s for s in services(render()).values())
