"""A normalised text picture of the schema the migrations build (Procrastinate's schema check).

Usage: python scripts/schema_snapshot.py DATABASE_URL [--write]

Lists, for our schemas, the tables (columns, constraints, indexes, row level security, grants),
the functions (signature, security, volatility, settings, grants and a hash of the body), the
policies and the triggers, one sorted line each. tests/integration/test_schema.py builds a
database from the migrations and compares its picture with tests/fixtures/schema.txt; after a
new migration, regenerate that file with --write and review the diff.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import psycopg

SCHEMAS = ("public", "private", "cpa")
FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "schema.txt"

QUERIES = {
    "column": """
        select format('column %%s.%%s.%%s %%s%%s%%s', n.nspname, c.relname, a.attname,
                      format_type(a.atttypid, a.atttypmod),
                      case when a.attnotnull then ' not null' else '' end,
                      coalesce(' default ' || pg_get_expr(d.adbin, d.adrelid), ''))
          from pg_attribute a join pg_class c on c.oid = a.attrelid
          join pg_namespace n on n.oid = c.relnamespace
          left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
         where n.nspname = any(%(schemas)s) and c.relkind in ('r', 'p', 'v')
           and a.attnum > 0 and not a.attisdropped and not (c.relispartition and c.relname ~ '_p[0-9]{6,8}$')""",
    "table": """
        select format('table %%s.%%s rls=%%s force=%%s grants=%%s', n.nspname, c.relname,
                      c.relrowsecurity, c.relforcerowsecurity,
                      (select string_agg(g.grantee::regrole::text || ':' || g.privilege_type,
                                         ',' order by g.grantee::regrole::text, g.privilege_type)
                         from (select (aclexplode(c.relacl)).*) g
                        -- the owner's own rights differ between versions (MAINTAIN in 17+)
                        where g.grantee not in (0, c.relowner)
                          and g.grantee::regrole::text <> 'supabase_admin'))
          from pg_class c join pg_namespace n on n.oid = c.relnamespace
         where n.nspname = any(%(schemas)s) and c.relkind in ('r', 'p', 'v') and not (c.relispartition and c.relname ~ '_p[0-9]{6,8}$')""",
    "constraint": """
        select format('constraint %%s.%%s %%s %%s', n.nspname, c.relname, k.conname,
                      pg_get_constraintdef(k.oid))
          from pg_constraint k join pg_class c on c.oid = k.conrelid
          join pg_namespace n on n.oid = c.relnamespace
         where n.nspname = any(%(schemas)s) and not (c.relispartition and c.relname ~ '_p[0-9]{6,8}$')
           and k.contype <> 'n'  -- PostgreSQL 18 lists NOT NULL here too; columns show it""",
    "index": """
        select format('index %%s', pg_get_indexdef(i.indexrelid))
          from pg_index i join pg_class c on c.oid = i.indrelid
          join pg_namespace n on n.oid = c.relnamespace
         where n.nspname = any(%(schemas)s) and not (c.relispartition and c.relname ~ '_p[0-9]{6,8}$')""",
    "function": """
        select format('function %%s.%%s(%%s) returns %%s %%s %%s config=%%s body=%%s grants=%%s',
                      n.nspname, p.proname, pg_get_function_identity_arguments(p.oid),
                      pg_get_function_result(p.oid),
                      case when p.prosecdef then 'security definer' else 'security invoker' end,
                      case p.provolatile when 'i' then 'immutable' when 's' then 'stable'
                           else 'volatile' end,
                      coalesce(array_to_string(p.proconfig, ','), ''), md5(p.prosrc),
                      (select string_agg(g.grantee_name || ':' || g.privilege_type, ','
                                         order by g.grantee_name, g.privilege_type)
                         from (select case when e.grantee = 0 then 'public'
                                           else e.grantee::regrole::text end as grantee_name,
                                      e.privilege_type
                                 from aclexplode(coalesce(p.proacl,
                                      acldefault('f', p.proowner))) e
                                where e.grantee <> p.proowner) g
                        where g.grantee_name not in ('supabase_admin', 'postgres')))
          from pg_proc p join pg_namespace n on n.oid = p.pronamespace
         where n.nspname = any(%(schemas)s)""",
    "policy": """
        select format('policy %%s.%%s %%s for %%s to %%s using (%%s) check (%%s)', schemaname,
                      tablename, policyname, cmd, array_to_string(roles, ','),
                      coalesce(qual, ''), coalesce(with_check, ''))
          from pg_policies where schemaname = any(%(schemas)s)""",
    "trigger": """
        select format('trigger %%s', pg_get_triggerdef(t.oid))
          from pg_trigger t join pg_class c on c.oid = t.tgrelid
          join pg_namespace n on n.oid = c.relnamespace
         where n.nspname = any(%(schemas)s) and not t.tgisinternal and not (c.relispartition and c.relname ~ '_p[0-9]{6,8}$')""",
}


def snapshot(url: str) -> str:
    """The sorted picture of the schemas in the database at ``url``."""
    lines: list[str] = []
    with psycopg.connect(url) as conn:
        for sql in QUERIES.values():
            rows = conn.execute(sql, {"schemas": list(SCHEMAS)}).fetchall()
            lines += [str(row[0]) for row in rows]
    return "\n".join(sorted(lines)) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--write", action="store_true", help=f"write {FIXTURE}")
    args = parser.parse_args()
    text = snapshot(args.url)
    if args.write:
        FIXTURE.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
