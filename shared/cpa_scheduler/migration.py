"""Apply the local bootstrap and the Supabase migrations.

Applied files are recorded in ``supabase_migrations.schema_migrations(version, statements,
name)``, the table the Supabase CLI uses, so ``supabase migration list`` and this runner agree.
Each file is applied in its own transaction together with its history row.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import psycopg

from cpa_scheduler import errors

_HISTORY = """
create schema if not exists supabase_migrations;
create table if not exists supabase_migrations.schema_migrations (
  version text not null primary key,
  statements text[],
  name text
);
"""


def supabase_dir() -> Path:
    """The ``supabase/`` folder: ``CPA_SUPABASE_DIR``, or the one beside the package."""
    configured = os.environ.get("CPA_SUPABASE_DIR")
    path = Path(configured) if configured else Path(__file__).resolve().parents[2] / "supabase"
    if not (path / "migrations").is_dir():
        raise errors.ConfigError(
            f"No migrations folder at {path / 'migrations'}; run from a checkout or set "
            "CPA_SUPABASE_DIR to the project's supabase/ folder."
        )
    return path


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    path: Path


def migrations(directory: Path | None = None) -> list[Migration]:
    """Migration files in version order."""
    folder = (directory or supabase_dir()) / "migrations"
    found = []
    for path in sorted(folder.glob("*.sql")):
        version, _, name = path.stem.partition("_")
        if not version.isdigit():
            raise errors.ConfigError(
                f"The migration {path.name!r} must be named <timestamp>_<name>.sql."
            )
        found.append(Migration(version, name, path))
    return found


def bootstrap(admin_url: str, directory: Path | None = None) -> None:
    """Make a plain Postgres database Supabase-like (idempotent; needs a superuser)."""
    sql = ((directory or supabase_dir()) / "local" / "bootstrap.sql").read_text("utf-8")
    with psycopg.connect(admin_url, autocommit=True, prepare_threshold=None) as conn:
        conn.execute("select pg_advisory_lock(7263001)")
        try:
            conn.execute(sql)
        finally:
            conn.execute("select pg_advisory_unlock(7263001)")


def apply(url: str, directory: Path | None = None) -> list[str]:
    """Apply pending migrations; returns the versions applied now."""
    applied_now: list[str] = []
    with psycopg.connect(url, prepare_threshold=None) as conn:
        with conn.transaction():
            conn.execute("select pg_advisory_xact_lock(7263002)")
            conn.execute(_HISTORY)
        conn.execute("select pg_advisory_lock(7263002)")
        try:
            rows = conn.execute("select version from supabase_migrations.schema_migrations")
            done = {row[0] for row in rows.fetchall()}
            conn.commit()
            for migration in migrations(directory):
                if migration.version in done:
                    continue
                sql = migration.path.read_text("utf-8")
                try:
                    with conn.transaction():
                        conn.execute(sql)
                        conn.execute(
                            "insert into supabase_migrations.schema_migrations"
                            " (version, statements, name) values (%s, %s, %s)",
                            (migration.version, [sql], migration.name),
                        )
                except psycopg.Error as exc:
                    raise errors.ConfigError(
                        f"The migration {migration.path.name} failed and was rolled back: "
                        f"{str(exc).strip()}"
                    ) from None
                applied_now.append(migration.version)
        finally:
            conn.execute("select pg_advisory_unlock(7263002)")
            conn.commit()
    return applied_now
