"""Logs as JSON lines with the known ids, the level from CPA_LOG_LEVEL, tracing off by default."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from collections.abc import Iterator

import pytest
from cpa_scheduler import errors, logs, metrics, settings, tracing


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_the_bound_ids_and_extras(restore_logging: None) -> None:
    out = io.StringIO()
    logs.setup(settings.from_env({"CPA_LOG_LEVEL": "debug"}), out, json_lines=True)
    log = logging.getLogger("cpa.test")
    with logs.bind(tenant_id="t1", job_id="j1"), logs.bind(todo_id="x1"):
        log.debug("ran %s", "noop", extra={"action": "noop"})
    log.info("outside")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["message"] == "ran noop" and first["level"] == "debug"
    assert (first["tenant_id"], first["job_id"], first["todo_id"]) == ("t1", "j1", "x1")
    assert first["action"] == "noop" and first["logger"] == "cpa.test"
    assert first["time"].endswith("+00:00")
    assert "job_id" not in second  # the binding ended with its block


def test_a_terminal_gets_readable_lines(restore_logging: None) -> None:
    out = io.StringIO()
    logs.setup(settings.Settings(), out, json_lines=False)
    with logs.bind(job_id="j1"):
        logging.getLogger("cpa.test").warning("slow")
    assert out.getvalue().strip() == "warning cpa.test: slow  job_id=j1"


def test_the_level_and_format_come_from_the_settings(restore_logging: None) -> None:
    assert settings.from_env({"CPA_LOG_LEVEL": "warning"}).log_level == logging.WARNING
    assert settings.from_env({"CPA_LOG_LEVEL": "15"}).log_level == 15
    assert settings.from_env({}).log_level == logging.INFO
    with pytest.raises(errors.ConfigError, match=r"CPA_LOG_LEVEL='loud' .* use DEBUG"):
        settings.from_env({"CPA_LOG_LEVEL": "loud"})
    out = io.StringIO()  # not a terminal, yet CPA_LOG_FORMAT=text forces readable lines
    logs.setup(settings.from_env({"CPA_LOG_FORMAT": "Text"}), out)
    logging.getLogger("cpa.test").warning("slow")
    assert out.getvalue().strip() == "warning cpa.test: slow"


def test_tracing_is_on_only_with_an_otlp_endpoint() -> None:
    assert not tracing.enabled({})
    assert tracing.enabled({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert tracing.enabled({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"})
    assert not tracing.enabled(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}
    )
    assert not tracing.enabled(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_TRACES_EXPORTER": "none"}
    )
    # Off: every helper is a no-op that needs nothing of OpenTelemetry.
    assert (
        tracing.traceparent() is None
        and tracing.parent("00-" + "1" * 32 + "-" + "2" * 16 + "-01") is None
    )
    with tracing.span("x") as span:
        assert span is None


def test_the_api_imports_no_opentelemetry_sdk_when_tracing_is_off() -> None:
    # FastAPI itself imports the (no-op) opentelemetry API when it is installed; the SDK, the
    # exporter and the instrumentations are ours to load, and only with an endpoint.
    heavy = ("opentelemetry.sdk", "opentelemetry.exporter", "opentelemetry.instrumentation")
    code = (
        "import sys, cpa_scheduler.api, functions.api; "
        f"print(sorted(m for m in sys.modules if m.startswith({heavy!r})))"
    )
    env = {"PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=60, check=True)  # fmt: skip
    assert done.stdout.strip() == "[]"


def test_emf_lines_name_their_metrics() -> None:
    line = json.loads(
        metrics.emf_line("Cpa", {"TodosDone": 3.0, "PassSeconds": 0.5}, {"Function": "d"})
    )
    directive = line["_aws"]["CloudWatchMetrics"][0]
    assert directive["Namespace"] == "Cpa" and directive["Dimensions"] == [["Function"]]
    assert {m["Name"]: m["Unit"] for m in directive["Metrics"]} == {
        "TodosDone": "Count", "PassSeconds": "Seconds"}  # fmt: skip
    assert (line["TodosDone"], line["Function"]) == (3.0, "d")
