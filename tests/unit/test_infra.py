"""Deployment files: handlers exist, schedules are valid, Railway configs use known keys."""

from __future__ import annotations

import importlib
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).parents[2]


class _CfnLoader(yaml.SafeLoader):
    pass


def _tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.ScalarNode):
        return {suffix: loader.construct_scalar(node)}
    if isinstance(node, yaml.SequenceNode):
        return {suffix: loader.construct_sequence(node)}
    return {suffix: loader.construct_mapping(node)}  # type: ignore[arg-type]


_CfnLoader.add_multi_constructor("!", _tag)
TEMPLATE = yaml.load((ROOT / "infra" / "template.yaml").read_text(), Loader=_CfnLoader)


def test_handlers_resolve_to_callables() -> None:
    for name, resource in TEMPLATE["Resources"].items():
        module, _, attr = resource["Properties"]["Handler"].rpartition(".")
        assert callable(getattr(importlib.import_module(module), attr)), name


def test_schedule_expressions_are_valid() -> None:
    # cfn-lint and sam validate do not check these (see serverless-deploy notes).
    rate = re.compile(r"^rate\((1 (minute|hour|day)|([2-9]|[1-9]\d+) (minutes|hours|days))\)$")
    found = 0
    for resource in TEMPLATE["Resources"].values():
        for event in resource["Properties"].get("Events", {}).values():
            if event["Type"] in ("Schedule", "ScheduleV2"):
                found += 1
                assert rate.match(event["Properties"]["ScheduleExpression"])
    assert found == 1


def test_api_uses_http_api_and_dispatcher_has_url() -> None:
    api = TEMPLATE["Resources"]["ApiFunction"]["Properties"]
    assert {e["Type"] for e in api["Events"].values()} == {"HttpApi"}
    assert (
        TEMPLATE["Resources"]["DispatcherFunction"]["Properties"]["FunctionUrlConfig"]["AuthType"]
        == "NONE"
    )


def test_railway_configs() -> None:
    known_deploy = {
        "startCommand",
        "preDeployCommand",
        "healthcheckPath",
        "healthcheckTimeout",
        "restartPolicyType",
        "restartPolicyMaxRetries",
        "numReplicas",
        "drainingSeconds",
    }
    for path in [ROOT / "railway.json", ROOT / "infra" / "railway" / "dispatcher.json"]:
        config = json.loads(path.read_text())
        assert config["build"]["builder"] in {"RAILPACK", "DOCKERFILE"}
        assert set(config["deploy"]) <= known_deploy, path
        assert config["deploy"]["restartPolicyType"] in {"ON_FAILURE", "ALWAYS", "NEVER"}
    worker = json.loads((ROOT / "infra" / "railway" / "dispatcher.json").read_text())
    assert worker["deploy"]["startCommand"] == "cpa-scheduler dispatch"


def test_supabase_major_is_the_one_the_matrix_runs() -> None:
    # A new hosted project runs 17; `make test-pg17` (in .ci/run) runs the database suites on it.
    config = tomllib.loads((ROOT / "supabase" / "config.toml").read_text())
    assert config["db"]["major_version"] == 17
    pinned = re.search(r"^PG17_VERSION := (\d+)\.", (ROOT / "Makefile").read_text(), re.M)
    assert pinned is not None and int(pinned.group(1)) == config["db"]["major_version"]
    assert "make test-pg17" in (ROOT / ".ci" / "run").read_text()
