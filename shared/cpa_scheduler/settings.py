"""Settings from the environment, validated once. Names are part of the public contract."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import platformdirs
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cpa_scheduler import errors


class Settings(BaseModel):
    """Everything configurable, read from environment variables by :func:`from_env`."""

    model_config = ConfigDict(frozen=True)

    database_url: str | None = None
    data_dir: Path = Field(
        default_factory=lambda: Path(platformdirs.user_data_dir("cpa-scheduler"))
    )
    supabase_url: str | None = None
    supabase_jwt_secret: str | None = None
    supabase_jwks_url: str | None = None
    # The project's publishable (anon) key: the client's Realtime connection needs it.
    supabase_publishable_key: str | None = None
    openai_api_key: str | None = None
    openai_base_url: str | None = None
    llm_model: str = "gpt-4o-mini"
    upstash_redis_rest_url: str | None = None
    upstash_redis_rest_token: str | None = None
    dispatch_secret: str | None = None
    dispatch_url: str | None = None
    api_url: str = "http://127.0.0.1:8000"
    http_allow: tuple[str, ...] = ()
    pool_max_size: int = 10
    rate_limit: int = 60
    rate_window: int = 60
    # Seconds one events answer may take behind a buffered host other than Mangum (which is
    # detected); unset means such answers stream until the job ends.
    events_bound: float | None = Field(default=None, gt=0, le=900)
    # Seconds a request waits for a pooled connection (or a new one) before its 503.
    db_timeout: float = Field(default=2.0, gt=0, le=60)
    # A worker whose database stays unreachable this long exits non-zero (0: never).
    dispatch_max_down: float = Field(default=300.0, ge=0)
    # Running cloud ToDos one tenant may hold at once (0: no cap), so one cannot fill the
    # dispatcher.
    tenant_running_cap: int = Field(default=64, ge=0)
    # Days job_events and finished jobs are kept, and audit_log entries.
    retention_days: int = Field(default=30, ge=1)
    audit_retention_days: int = Field(default=365, ge=1)

    @property
    def tenant_cap(self) -> int | None:
        return self.tenant_running_cap or None

    @property
    def local(self) -> bool:
        """Local (embedded) mode: no DATABASE_URL was given."""
        return self.database_url is None

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


_ENV = {
    "database_url": "DATABASE_URL",
    "data_dir": "CPA_DATA_DIR",
    "supabase_url": "SUPABASE_URL",
    "supabase_jwt_secret": "SUPABASE_JWT_SECRET",
    "supabase_jwks_url": "SUPABASE_JWKS_URL",
    "supabase_publishable_key": "SUPABASE_PUBLISHABLE_KEY",
    "openai_api_key": "OPENAI_API_KEY",
    "openai_base_url": "OPENAI_BASE_URL",
    "llm_model": "CPA_LLM_MODEL",
    "upstash_redis_rest_url": "UPSTASH_REDIS_REST_URL",
    "upstash_redis_rest_token": "UPSTASH_REDIS_REST_TOKEN",
    "dispatch_secret": "CPA_DISPATCH_SECRET",
    "dispatch_url": "CPA_DISPATCH_URL",
    "api_url": "CPA_API_URL",
    "rate_limit": "CPA_RATE_LIMIT",
    "rate_window": "CPA_RATE_WINDOW",
    "events_bound": "CPA_EVENTS_BOUND",
    "db_timeout": "CPA_DB_TIMEOUT",
    "dispatch_max_down": "CPA_DISPATCH_MAX_DOWN",
    "tenant_running_cap": "CPA_TENANT_RUNNING_CAP",
    "retention_days": "CPA_RETENTION_DAYS",
    "audit_retention_days": "CPA_AUDIT_RETENTION_DAYS",
}


def from_env(env: Mapping[str, str] | None = None) -> Settings:
    """Settings from the process environment (or the given mapping); empty values count as unset."""
    source = os.environ if env is None else env
    values: dict[str, object] = {
        field: source[name] for field, name in _ENV.items() if source.get(name, "").strip()
    }
    # Older projects call the publishable key the anon key.
    anon = source.get("SUPABASE_ANON_KEY", "").strip()
    if anon and "supabase_publishable_key" not in values:
        values["supabase_publishable_key"] = anon
    allow = source.get("CPA_HTTP_ALLOW", "")
    values["http_allow"] = tuple(a.strip() for a in allow.split(",") if a.strip())
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        # Users set environment variables, not fields: name the variable and its value.
        first = exc.errors(include_url=False)[0]
        field = str(first["loc"][0]) if first["loc"] else ""
        name = _ENV.get(field, "CPA_HTTP_ALLOW" if field == "http_allow" else field)
        raise errors.ConfigError(
            f"The environment variable {name}={source.get(name, '')!r} is not valid: "
            f"{first['msg']}. Fix or unset {name}."
        ) from None
