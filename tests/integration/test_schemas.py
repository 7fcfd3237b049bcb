"""supabase/schemas/ defines what the migrations build (procrastinate's migration test).

One database gets the local bootstrap and every migration (the session's template), another
the bootstrap and the files of ``supabase/schemas/`` in name order; their catalogues must
match object by object, function bodies included (``scripts/schemas.py``, ``catalogue``). A
failure names each object that differs: after a new migration, regenerate the files with
``python scripts/schemas.py write`` and review their diff. CI runs it on PostgreSQL 15, 17 and
18.
"""

from __future__ import annotations

import importlib.util
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from cpa_scheduler import migration

from tests.conftest import Server

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("schemas", ROOT / "scripts" / "schemas.py")
assert _spec is not None and _spec.loader is not None
schemas = importlib.util.module_from_spec(_spec)
sys.modules["schemas"] = schemas  # its dataclasses look their module up there
_spec.loader.exec_module(schemas)


@pytest.fixture
def declared_url(pg_server: Server) -> Iterator[str]:
    """A database built from the local bootstrap and supabase/schemas/ alone."""
    name = f"cpa_decl_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server.admin("postgres"), autocommit=True) as conn:
        conn.execute(f'create database "{name}" owner "{pg_server.app_user}"')  # type: ignore[arg-type]
    try:
        migration.bootstrap(pg_server.admin(name))
        schemas.apply_files(pg_server.url(name), schemas.files())
        yield pg_server.url(name)
    finally:
        with psycopg.connect(pg_server.admin("postgres"), autocommit=True) as conn:
            conn.execute(f'drop database if exists "{name}" with (force)')  # type: ignore[arg-type]


def test_the_schema_files_build_what_the_migrations_build(db_url: str, declared_url: str) -> None:
    migrated = schemas.catalogue(db_url)
    assert any(name.startswith("function cpa.") for name in migrated)  # the catalogue sees them
    wrong = schemas.differences(migrated, schemas.catalogue(declared_url))
    assert not wrong, (
        "supabase/schemas/ and the migrations define these objects differently; if the "
        "migrations are right, run: python scripts/schemas.py write\n" + "\n".join(wrong)
    )


def test_every_subject_file_opens_with_its_invariants() -> None:
    files = schemas.files()
    assert [p.name for p in files] == [str(s["file"]) for s in schemas.SUBJECTS]
    for path in files:
        head = path.read_text().split("\n\n", 1)[0]
        assert head.startswith("-- ") and len(head.splitlines()) >= 4, path.name


def test_an_object_no_subject_claims_stops_the_script_with_its_name() -> None:
    entry = schemas.Entry("FUNCTION", "cpa", "todo_teleport_v1(p uuid)", "create function ...")
    with pytest.raises(SystemExit, match=r"function cpa\.todo_teleport"):
        schemas.classify(entry, {})
