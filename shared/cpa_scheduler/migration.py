"""Apply the local bootstrap and the Supabase migrations.

Applied files are recorded in ``supabase_migrations.schema_migrations(version, statements,
name)``, the table the Supabase CLI uses, so ``supabase migration list`` and this runner agree.
Each file is applied in its own transaction together with its history row.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cpa_scheduler import errors

if TYPE_CHECKING:
    import psycopg

_HISTORY = """
create schema if not exists supabase_migrations;
create table if not exists supabase_migrations.schema_migrations (
  version text not null primary key,
  statements text[],
  name text
);
"""


def supabase_dir(configured: Path | None = None) -> Traversable:
    """The ``supabase/`` folder: ``configured`` (``CPA_SUPABASE_DIR``, see
    :attr:`Settings.supabase_dir <cpa_scheduler.settings.Settings.supabase_dir>`), or the copy
    shipped in the package.

    In a checkout the package's ``supabase`` entry is a link to the top-level ``supabase/``
    (the one the Supabase CLI reads); a built wheel carries a copy of its migrations and the
    local bootstrap, so an installed package migrates from any directory.
    """
    path: Traversable = (
        configured if configured else resources.files("cpa_scheduler").joinpath("supabase")
    )
    if not path.joinpath("migrations").is_dir():
        where = f"CPA_SUPABASE_DIR={configured}" if configured else "the installed package"
        raise errors.ConfigError(
            f"No migrations folder in {where}; set CPA_SUPABASE_DIR to the project's supabase/ "
            "folder, or reinstall cpa-scheduler (its wheel ships the migrations)."
        )
    return path


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    path: Traversable


def migrations(directory: Traversable | None = None) -> list[Migration]:
    """Migration files in version order."""
    folder = (directory or supabase_dir()).joinpath("migrations")
    found = []
    files = (entry for entry in folder.iterdir() if entry.name.endswith(".sql"))
    for path in sorted(files, key=lambda entry: entry.name):
        version, _, name = path.name.removesuffix(".sql").partition("_")
        if not version.isdigit():
            raise errors.ConfigError(
                f"The migration {path.name!r} must be named <timestamp>_<name>.sql."
            )
        found.append(Migration(version, name, path))
    return found


def _options() -> dict[str, Any]:
    """Keepalives and tcp_user_timeout as every connection has them (a dead network is an
    error, not a hang); connecting may take up to 10 s."""
    from cpa_scheduler import store

    return {**store.connect_options(2.0), "connect_timeout": 10}


def bootstrap(admin_url: str, directory: Traversable | None = None) -> None:
    """Make a plain Postgres database Supabase-like (idempotent; needs a superuser)."""
    import psycopg  # deferred: the Lambda handlers import this module but never migrate

    sql = (directory or supabase_dir()).joinpath("local", "bootstrap.sql").read_text("utf-8")
    with psycopg.connect(admin_url, autocommit=True, prepare_threshold=None, **_options()) as conn:
        conn.execute("select pg_advisory_lock(7263001)")
        try:
            conn.execute(sql)
        finally:
            conn.execute("select pg_advisory_unlock(7263001)")


def apply(url: str, directory: Traversable | None = None) -> list[str]:
    """Apply pending migrations; returns the versions applied now."""
    import psycopg

    applied_now: list[str] = []
    with psycopg.connect(url, prepare_threshold=None, **_options()) as conn:
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
            sync_catalogue(conn)
        finally:
            conn.execute("select pg_advisory_unlock(7263002)")
            conn.commit()
    return applied_now


def sync_catalogue(conn: psycopg.Connection[Any]) -> None:
    """Upsert the shipped action catalogue into ``private.catalogue_actions``.

    The database refuses ToDos whose action is not in that table; a migration fills it, and
    this keeps it equal to the actions.yaml of the installed package.
    """
    import json

    from cpa_scheduler import catalogue, sql

    rows = [
        {
            "name": a.name,
            "target": a.target,
            "requires_confirmation": a.requires_confirmation,
            "params_schema": a.params,
        }
        for a in catalogue.default().actions.values()
    ]
    with conn.transaction():
        found = conn.execute("select to_regclass('private.catalogue_actions')").fetchone()
        if found is None or found[0] is None:  # a migrations folder from before the table
            return
        conn.execute(sql.get("catalogue_sync"), {"actions": json.dumps(rows)})
