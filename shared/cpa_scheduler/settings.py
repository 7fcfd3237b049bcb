"""Settings from the environment, validated once. Names are part of the public contract.

The server's :class:`Settings` and the command-line clients' :class:`ClientSettings` are read
apart, so that a client command needs none of the server's variables. The ``OTEL_*`` variables
are not here: the OpenTelemetry SDK reads them itself (see :mod:`cpa_scheduler.tracing`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, TypeVar

import platformdirs
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cpa_scheduler import errors


class Settings(BaseModel):
    """Everything configurable on the server side, read from environment variables by
    :func:`from_env`."""

    model_config = ConfigDict(frozen=True)

    database_url: str | None = None
    data_dir: Path = Field(
        default_factory=lambda: Path(platformdirs.user_data_dir("cpa-scheduler"))
    )
    # The supabase/ folder to migrate from; None: the copy shipped in the package.
    supabase_dir: Path | None = None
    supabase_url: str | None = None
    # The project's publishable (anon) key: the jobs page (/ui) joins Realtime with it.
    supabase_publishable_key: str | None = None
    supabase_jwt_secret: str | None = None
    supabase_jwks_url: str | None = None
    openai_api_key: str | None = None
    openai_base_url: str | None = None
    llm_model: str = "gpt-4o-mini"
    upstash_redis_rest_url: str | None = None
    upstash_redis_rest_token: str | None = None
    dispatch_secret: str | None = None
    dispatch_url: str | None = None
    http_allow: tuple[str, ...] = ()
    pool_max_size: int = 10
    rate_limit: int = 60
    rate_window: int = 60
    # Seconds one events answer may take behind a buffered host other than Mangum (which is
    # detected); unset means such answers stream until the job ends.
    events_bound: float | None = Field(default=None, gt=0, le=900)
    # Seconds a request waits for a pooled connection (or a new one) before its 503.
    db_timeout: float = Field(default=2.0, gt=0, le=60)
    # Seconds a scheduled pass may run when its invocation has no clock of its own (no Lambda
    # context); a Lambda pass runs for the invocation's remaining time.
    dispatch_budget: float = Field(default=50.0, ge=0)
    # A worker whose database stays unreachable this long exits non-zero (0: never).
    dispatch_max_down: float = Field(default=300.0, ge=0)
    # Running cloud ToDos one tenant may hold at once (0: no cap), so one cannot fill the
    # dispatcher.
    tenant_running_cap: int = Field(default=64, ge=0)
    # Lost leases (the worker running the ToDo died or stopped answering) a ToDo may cost
    # before it fails for good; they do not count against its max_attempts.
    lost_lease_limit: int = Field(default=5, ge=1, le=1000)
    # Active (unpaused) schedules per tenant, and the jobs a tenant's schedules may start in one
    # minute: an occurrence past that budget is skipped (a cancelled job without ToDos).
    schedule_cap: int = Field(default=100, ge=1)
    schedule_jobs_per_minute: int = Field(default=60, ge=1)
    # Days job_events and finished jobs are kept, and audit_log entries.
    retention_days: int = Field(default=30, ge=1)
    audit_retention_days: int = Field(default=365, ge=1)
    # Logging: a level name or number; json or text lines (None: text on a terminal only).
    log_level: int = logging.INFO
    log_format: Literal["json", "text"] | None = None
    # /metrics: the scrapers' bearer token (None: open), and how many of the busiest tenants
    # get series of their own (0: none; each is a series per scrape).
    metrics_token: str | None = None
    metrics_top_tenants: int = Field(default=0, ge=0)
    # Set by the Lambda runtime (AWS_LAMBDA_FUNCTION_NAME), not by operators.
    lambda_function_name: str | None = None

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_by_name(cls, value: object) -> object:
        if not isinstance(value, str) or value.strip().isdigit():
            return value
        level = logging.getLevelName(value.strip().upper())
        if not isinstance(level, int):
            raise ValueError("not a log level; use DEBUG, INFO, WARNING or ERROR")
        return level

    @field_validator("log_format", mode="before")
    @classmethod
    def _format_any_case(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @property
    def tenant_cap(self) -> int | None:
        return self.tenant_running_cap or None

    @property
    def local(self) -> bool:
        """Local (embedded) mode: no DATABASE_URL was given."""
        return self.database_url is None

    @property
    def on_lambda(self) -> bool:
        """This process is an AWS Lambda function."""
        return bool(self.lambda_function_name)

    @property
    def planner_configured(self) -> bool:
        """An LLM provider is configured (OpenAI, or a compatible server by base URL)."""
        return bool(self.openai_api_key or self.openai_base_url)

    @property
    def upstash(self) -> tuple[str, str] | None:
        """Upstash Redis's REST URL and token when both are set (rate limits, plan cache)."""
        if self.upstash_redis_rest_url and self.upstash_redis_rest_token:
            return self.upstash_redis_rest_url, self.upstash_redis_rest_token
        return None

    @property
    def jwks_url(self) -> str | None:
        if self.supabase_jwks_url:
            return self.supabase_jwks_url
        if self.supabase_url:
            return self.supabase_url.rstrip("/") + "/auth/v1/.well-known/jwks.json"
        return None

    @property
    def issuer(self) -> str | None:
        if self.supabase_url:
            return self.supabase_url.rstrip("/") + "/auth/v1"
        return None


class ClientSettings(BaseModel):
    """What the command-line clients (submit, watch, agent, ...) read, by
    :func:`client_from_env`: where the API is and who calls it."""

    model_config = ConfigDict(frozen=True)

    api_url: str = "http://127.0.0.1:8000"
    token: str | None = None
    # A Supabase refresh token: the client renews an expired access token with it.
    refresh_token: str | None = None
    supabase_url: str | None = None
    # The project's publishable (anon) key: the client's Realtime connection needs it.
    supabase_publishable_key: str | None = None
    # The POSIX TZ of the machine, as an IANA zone (its leading ':' dropped); None: unset.
    time_zone: str | None = None

    @field_validator("time_zone", mode="before")
    @classmethod
    def _posix_tz(cls, value: object) -> object:
        return (value.lstrip(":").strip() or None) if isinstance(value, str) else value

    @property
    def realtime(self) -> tuple[str, str] | None:
        """The Supabase project and its publishable key when both are set (Realtime progress)."""
        if self.supabase_url and self.supabase_publishable_key:
            return self.supabase_url, self.supabase_publishable_key
        return None


_ENV = {
    "database_url": "DATABASE_URL",
    "data_dir": "CPA_DATA_DIR",
    "supabase_dir": "CPA_SUPABASE_DIR",
    "supabase_url": "SUPABASE_URL",
    "supabase_publishable_key": "SUPABASE_PUBLISHABLE_KEY",
    "supabase_jwt_secret": "SUPABASE_JWT_SECRET",
    "supabase_jwks_url": "SUPABASE_JWKS_URL",
    "openai_api_key": "OPENAI_API_KEY",
    "openai_base_url": "OPENAI_BASE_URL",
    "llm_model": "CPA_LLM_MODEL",
    "upstash_redis_rest_url": "UPSTASH_REDIS_REST_URL",
    "upstash_redis_rest_token": "UPSTASH_REDIS_REST_TOKEN",
    "dispatch_secret": "CPA_DISPATCH_SECRET",
    "dispatch_url": "CPA_DISPATCH_URL",
    "http_allow": "CPA_HTTP_ALLOW",
    "rate_limit": "CPA_RATE_LIMIT",
    "rate_window": "CPA_RATE_WINDOW",
    "events_bound": "CPA_EVENTS_BOUND",
    "db_timeout": "CPA_DB_TIMEOUT",
    "dispatch_budget": "CPA_DISPATCH_BUDGET",
    "dispatch_max_down": "CPA_DISPATCH_MAX_DOWN",
    "tenant_running_cap": "CPA_TENANT_RUNNING_CAP",
    "lost_lease_limit": "CPA_LOST_LEASE_LIMIT",
    "schedule_cap": "CPA_SCHEDULE_CAP",
    "schedule_jobs_per_minute": "CPA_SCHEDULE_JOBS_PER_MINUTE",
    "retention_days": "CPA_RETENTION_DAYS",
    "audit_retention_days": "CPA_AUDIT_RETENTION_DAYS",
    "log_level": "CPA_LOG_LEVEL",
    "log_format": "CPA_LOG_FORMAT",
    "metrics_token": "CPA_METRICS_TOKEN",
    "metrics_top_tenants": "CPA_METRICS_TOP_TENANTS",
    "lambda_function_name": "AWS_LAMBDA_FUNCTION_NAME",
}

_CLIENT_ENV = {
    "api_url": "CPA_API_URL",
    "token": "CPA_TOKEN",
    "refresh_token": "CPA_REFRESH_TOKEN",
    "supabase_url": "SUPABASE_URL",
    "supabase_publishable_key": "SUPABASE_PUBLISHABLE_KEY",
    "time_zone": "TZ",
}

_Model = TypeVar("_Model", Settings, ClientSettings)


def from_env(env: Mapping[str, str] | None = None) -> Settings:
    """Settings from the process environment (or the given mapping); empty values count as unset."""
    source = os.environ if env is None else env
    values = _present(_ENV, source)
    allow = values.get("http_allow", "")
    values["http_allow"] = tuple(a.strip() for a in str(allow).split(",") if a.strip())
    anon = source.get("SUPABASE_ANON_KEY", "").strip()  # older projects' name for the key
    if anon and "supabase_publishable_key" not in values:
        values["supabase_publishable_key"] = anon
    return _validate(Settings, _ENV, values, source)


def client_from_env(env: Mapping[str, str] | None = None) -> ClientSettings:
    """The clients' settings from the process environment (or the given mapping)."""
    source = os.environ if env is None else env
    values = {field: str(value).strip() for field, value in _present(_CLIENT_ENV, source).items()}
    # Older projects call the publishable key the anon key.
    anon = source.get("SUPABASE_ANON_KEY", "").strip()
    if anon and "supabase_publishable_key" not in values:
        values["supabase_publishable_key"] = anon
    return _validate(ClientSettings, _CLIENT_ENV, values, source)


def _present(names: Mapping[str, str], source: Mapping[str, str]) -> dict[str, object]:
    """The fields whose variables are set to something other than blanks."""
    return {field: source[name] for field, name in names.items() if source.get(name, "").strip()}


def _validate(
    model: type[_Model],
    names: Mapping[str, str],
    values: Mapping[str, object],
    source: Mapping[str, str],
) -> _Model:
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        # Users set environment variables, not fields: name the variable and its value.
        first = exc.errors(include_url=False)[0]
        field = str(first["loc"][0]) if first["loc"] else ""
        name = names.get(field, field)
        raise errors.ConfigError(
            f"The environment variable {name}={source.get(name, '')!r} is not valid: "
            f"{first['msg']}. Fix or unset {name}."
        ) from None
