"""The schema the migrations build equals the one the code expects (tests/fixtures/schema.txt).

A migration that changes a table, a function, a grant or a policy must come with the
regenerated picture (``python scripts/schema_snapshot.py URL --write``), so every schema change
shows up in review as a diff of plain lines. The picture is the same on PostgreSQL 15, 17 and 18
(CI builds it on each).
"""

from __future__ import annotations

import difflib
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "schema_snapshot", ROOT / "scripts" / "schema_snapshot.py"
)
assert _spec is not None and _spec.loader is not None
schema_snapshot = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(schema_snapshot)


def test_migrations_build_the_expected_schema(db_url: str) -> None:
    expected = schema_snapshot.FIXTURE.read_text()
    actual = schema_snapshot.snapshot(db_url)
    diff = "".join(
        difflib.unified_diff(
            expected.splitlines(keepends=True), actual.splitlines(keepends=True),
            "tests/fixtures/schema.txt", "built from supabase/migrations", n=0,
        )
    )  # fmt: skip
    assert not diff, (
        "The migrations build a schema other than tests/fixtures/schema.txt; if the change is "
        "intended, run: python scripts/schema_snapshot.py <database url> --write\n" + diff
    )
