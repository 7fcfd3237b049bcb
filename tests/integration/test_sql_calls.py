"""The SQL the code sends resolves after every migration, this release's and the previous one's.

A deploy runs the migrations first and the new code after (supabase/README.md, "Versions and
deploys"), so the database must answer both releases' calls. ``tests/fixtures/calls_e2715a4.txt``
lists the functions the previous release calls, with their argument types (its header says how
the list was derived). This release's calls are checked by preparing every named query, which
resolves each function by name and argument types as the real call does. And a function may be
dropped only if no live function names it: every ``cpa.``/``private.``/``public.`` name in a
function body must still be a function, a table or a type.
"""

from __future__ import annotations

import re
from pathlib import Path

import psycopg
from cpa_scheduler import sql

ROOT = Path(__file__).resolve().parents[2]
PREVIOUS = ROOT / "tests" / "fixtures" / "calls_e2715a4.txt"
_PLACEHOLDER = re.compile(r"%\((\w+)\)s")
_NAMED = re.compile(r"\b(cpa|private|public)\.(\w+)\s*\(")


def _positional(query: str) -> str:
    """psycopg's ``%(name)s`` placeholders as ``$n`` (one number per name), for PREPARE."""
    numbers: dict[str, int] = {}

    def number(match: re.Match[str]) -> str:
        return f"${numbers.setdefault(match.group(1), len(numbers) + 1)}"

    return _PLACEHOLDER.sub(number, query).replace("%%", "%")


def test_the_previous_release_calls_still_resolve(db_url: str) -> None:
    calls = [
        line.strip()
        for line in PREVIOUS.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    with psycopg.connect(db_url) as conn:
        missing = [
            call
            for call in calls
            if conn.execute("select to_regprocedure(%s)", [call]).fetchone() == (None,)
        ]
    assert not missing, (
        f"The previous release (e2715a4) calls {missing}, which no longer resolve; a deploy "
        "runs the migrations before the code, so keep these functions until the release after "
        "next (supabase/README.md, 'Versions and deploys')."
    )


def test_every_named_query_resolves(db_url: str) -> None:
    failed: list[str] = []
    with psycopg.connect(db_url, autocommit=True) as conn:
        for name, query in sql.queries().items():
            try:
                conn.execute(f"prepare cpa_check as {_positional(query)}")  # type: ignore[arg-type]
                conn.execute("deallocate cpa_check")
            except psycopg.Error as exc:
                failed.append(f"{name}: {exc.diag.message_primary}")
    assert not failed, "queries.sql names what the migrated database lacks:\n" + "\n".join(failed)


def test_live_functions_name_only_existing_objects(db_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        bodies = conn.execute(
            """select n.nspname || '.' || p.proname, p.prosrc
                 from pg_proc p join pg_namespace n on n.oid = p.pronamespace
                where n.nspname in ('cpa', 'private', 'public')"""
        ).fetchall()
        known = {
            row[0]
            for row in conn.execute(
                """select n.nspname || '.' || p.proname
                     from pg_proc p join pg_namespace n on n.oid = p.pronamespace
                   union all
                   select n.nspname || '.' || c.relname
                     from pg_class c join pg_namespace n on n.oid = c.relnamespace
                   union all
                   select n.nspname || '.' || t.typname
                     from pg_type t join pg_namespace n on n.oid = t.typnamespace"""
            )
        }
    dangling = sorted(
        f"{function} names {schema}.{name}"
        for function, body in bodies
        for schema, name in _NAMED.findall(body)
        if f"{schema}.{name}" not in known
    )
    assert not dangling, (
        "Live functions call what no longer exists (a contract migration dropped a function "
        "still in use?):\n" + "\n".join(dangling)
    )
