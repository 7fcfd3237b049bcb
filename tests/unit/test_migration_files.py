"""Migrations are append-only, and every function they create is granted beside it.

``tests/fixtures/migrations.sha256`` pins each applied migration's content (Flyway's checksum
check): an edit to a migration a deployed database has already run would never reach it. A new
migration is added to the list with::

    (cd supabase/migrations && sha256sum *.sql) > tests/fixtures/migrations.sha256
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MIGRATIONS = ROOT / "supabase" / "migrations"
LOCK = ROOT / "tests" / "fixtures" / "migrations.sha256"
# Migrations before this one granted in lists at the end; they are append-only, so they stay.
GRANTS_BESIDE_FROM = "20261127000700"

_CREATE = re.compile(r"create\s+(?:or\s+replace\s+)?function\s+([\w.]+)\s*\(", re.I)


def _locked() -> dict[str, str]:
    pairs = (line.split() for line in LOCK.read_text().splitlines() if line.strip())
    return {name: digest for digest, name in pairs}


def test_applied_migrations_are_unchanged() -> None:
    changed = [
        name
        for name, digest in _locked().items()
        if not (MIGRATIONS / name).exists()
        or hashlib.sha256((MIGRATIONS / name).read_bytes()).hexdigest() != digest
    ]
    assert not changed, (
        f"migrations {changed} were edited or removed; they are append-only: put the change "
        "in a new migration instead (create or replace a compatible change in place; a new _vN name only for a changed signature or meaning; supabase/README.md)"
    )


def test_every_migration_is_in_the_lock() -> None:
    missing = sorted({p.name for p in MIGRATIONS.glob("*.sql")} - set(_locked()))
    assert not missing, (
        f"migrations {missing} are not in tests/fixtures/migrations.sha256; add them with: "
        "(cd supabase/migrations && sha256sum *.sql) > tests/fixtures/migrations.sha256"
    )


def test_new_migrations_grant_each_function_beside_it() -> None:
    loose: list[str] = []
    for path in sorted(MIGRATIONS.glob("*.sql")):
        if path.name < GRANTS_BESIDE_FROM:
            continue
        text = path.read_text()
        creates = list(_CREATE.finditer(text))
        if not creates:  # a migration of indexes or grants only
            continue
        for here, after in zip(creates, [*creates[1:], None], strict=True):
            name = here.group(1)
            block = text[here.start() : after.start() if after else len(text)]
            grant = re.compile(
                rf"(grant|revoke)\s+execute\s+on\s+function\s+{re.escape(name)}\s*\(", re.I
            )
            if not grant.search(block):
                loose.append(f"{path.name}: {name}")
    assert not loose, (
        f"functions without a grant or revoke right after their definition: {loose}; "
        "grant each function beside it (revoke from public first)"
    )
