"""Settings: every variable is read here, validated, and a bad one is named with its fix."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from cpa_scheduler import errors, migration, settings


def test_the_server_variables_become_typed_fields() -> None:
    cfg = settings.from_env(
        {
            "CPA_DISPATCH_BUDGET": "12.5",
            "CPA_DISPATCH_SECRET": "kick",
            "AWS_LAMBDA_FUNCTION_NAME": "cpa-dispatcher",
            "CPA_LOG_LEVEL": "warning",
            "CPA_LOG_FORMAT": "JSON",
            "CPA_METRICS_TOKEN": "scrape",
            "CPA_METRICS_TOP_TENANTS": "5",
            "CPA_SUPABASE_DIR": "/srv/supabase",
            "CPA_HTTP_ALLOW": "a.example, b.example",
        }
    )
    assert (cfg.dispatch_budget, cfg.dispatch_secret, cfg.on_lambda) == (12.5, "kick", True)
    assert (cfg.log_level, cfg.log_format) == (logging.WARNING, "json")
    assert (cfg.metrics_token, cfg.metrics_top_tenants) == ("scrape", 5)
    assert cfg.supabase_dir == Path("/srv/supabase")
    assert cfg.http_allow == ("a.example", "b.example")


def test_defaults_when_unset_or_blank() -> None:
    cfg = settings.from_env({"CPA_LOG_LEVEL": "  ", "CPA_METRICS_TOKEN": ""})
    assert (cfg.dispatch_budget, cfg.on_lambda, cfg.log_level, cfg.log_format) == (
        50.0, False, logging.INFO, None)  # fmt: skip
    assert (cfg.metrics_token, cfg.metrics_top_tenants, cfg.supabase_dir) == (None, 0, None)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CPA_LOG_LEVEL", "loud"),
        ("CPA_LOG_FORMAT", "xml"),
        ("CPA_METRICS_TOP_TENANTS", "many"),
        ("CPA_DISPATCH_BUDGET", "-1"),
    ],
)
def test_a_bad_value_is_named_with_its_fix(name: str, value: str) -> None:
    with pytest.raises(errors.ConfigError) as info:
        settings.from_env({name: value})
    assert f"{name}={value!r} is not valid" in info.value.message
    assert f"Fix or unset {name}." in info.value.message


def test_clients_read_only_their_own_variables() -> None:
    env = {
        "CPA_API_URL": "https://api.example",
        "CPA_TOKEN": " tok ",
        "CPA_REFRESH_TOKEN": "ref",
        "SUPABASE_URL": "https://abc.supabase.co",
        "SUPABASE_ANON_KEY": "anon",  # the older name of the publishable key
        "TZ": ":Europe/Berlin",
        "CPA_RATE_LIMIT": "lots",  # the server's, and invalid: not the client's business
    }
    cfg = settings.client_from_env(env)
    assert (cfg.api_url, cfg.token, cfg.refresh_token) == ("https://api.example", "tok", "ref")
    assert cfg.realtime == ("https://abc.supabase.co", "anon")
    assert cfg.time_zone == "Europe/Berlin"
    assert settings.client_from_env({"SUPABASE_URL": "https://abc.supabase.co"}).realtime is None
    assert settings.client_from_env({}).time_zone is None


def test_the_supabase_folder_is_configured_or_shipped(tmp_path: Path) -> None:
    assert migration.supabase_dir().joinpath("migrations").is_dir()  # the package's copy
    (tmp_path / "migrations").mkdir()
    assert migration.supabase_dir(tmp_path) == tmp_path
    with pytest.raises(errors.ConfigError, match="CPA_SUPABASE_DIR="):
        migration.supabase_dir(tmp_path / "missing")
