"""supabase/schemas/: the current database, one file a subject, regenerated from the migrations.

Usage:
    python scripts/schemas.py write [--url ADMIN_URL] [--pg-bin DIR]
    python scripts/schemas.py check [--url ADMIN_URL]
    python scripts/schemas.py diff [--url ADMIN_URL]

The migrations are the history a deployed database replays; ``supabase/schemas/`` (Supabase's
declarative-schema folder) is what that history builds today, readable in one place: every
table, index, policy, grant, trigger and function of schemas ``public``, ``private`` and
``cpa`` (and the policies the migrations put on ``realtime.messages``), grouped by subject.

``write`` builds a database from the local bootstrap plus every migration and one from the
bootstrap alone, dumps both with ``pg_dump --schema-only``, keeps what the migrations added,
and sorts each object into its subject's file by ``SUBJECTS`` below (by table, or by function
name without its ``_vN``). An object no subject claims stops the script with its name: add it
to ``SUBJECTS``. Each file opens with its subject's header (the invariants that subject keeps),
kept here. Run it after adding a migration and commit the result.

``check`` builds one database from the migrations and one from the files (after the bootstrap,
in file name order) and compares their catalogues (``catalogue()``: columns, constraints,
indexes, grants, row level security, policies, triggers, types, comments and whole function
definitions); it fails naming each object that differs. tests/integration/test_schemas.py does
the same on the test server.

``diff`` is the other direction: after an edit to a schema file it prints the SQL from the
migrations' database to the files' (``supabase db diff --from URL --to URL``, the Supabase
CLI's pg-delta engine, which needs no Docker in this explicit mode; the CLI's default mode,
a shadow database from the migrations, needs Docker). Review it, save it as the next migration
(a changed function as ``create or replace`` under its own name, supabase/README.md), then run
``write`` so the files come from the migrations again.

Without ``--url`` the commands start a throw-away embedded PostgreSQL (the local-mode server)
and ``write`` uses that server's ``pg_dump``. ``--url`` names a superuser connection to another
server (``--pg-bin`` the directory of a ``pg_dump`` at least as new as that server).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
from cpa_scheduler import embedded, migration
from psycopg.conninfo import conninfo_to_dict, make_conninfo

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS_DIR = ROOT / "supabase" / "schemas"
APP_USER = "postgres"
SUPABASE_CLI = [
    "npx",
    "--yes",
    "supabase@2.117.0",
]  # the version scripts/supabase_check.py runs  # migrations run as the project's owner role, as `supabase db push` does

# One subject a file, applied in this order. ``tables`` are claimed with everything on them
# (columns, constraints, indexes, sequences, row level security, policies, comments, grants);
# ``functions`` by name without the version suffix (``todo_claim`` claims ``todo_claim_v3``),
# with their grants and comments; a trigger goes with the function it runs.
SUBJECTS: list[dict[str, object]] = [
    {
        "file": "00_tenancy.sql",
        "title": "Tenancy: tenants, memberships and the membership checks every policy uses",
        "invariants": [
            "Every tenant-owned row carries tenant_id; RLS is enabled on every table and each",
            "policy is `to authenticated`, reading `private.user_tenant_ids_v1()` once per",
            "statement. Schemas `cpa` (operations) and `private` (helpers) are not exposed to the",
            "Data API; their functions are `security definer` with `search_path = ''` and check",
            "membership inside (`private.tenant_authorize_v1`, the `*_authorized_v1` helpers).",
        ],
        "schemas": ["cpa", "private", "public"],
        "tables": ["public.tenants", "public.memberships"],
        "functions": [
            "private.user_tenant_ids",
            "private.user_admin_tenant_ids",
            "private.job_visible",
            "private.tenant_authorize",
            "private.caller_is_user",
        ],
    },
    {
        "file": "10_jobs_and_todos.sql",
        "title": "Jobs and ToDos: the graph, its creation and what SQL refuses",
        "invariants": [
            "A job owns 1-1000 ToDos joined by edges inside the job, acyclic; a ToDo is `ready`",
            "exactly when `deps_remaining` reaches 0 (the completing transaction decrements it;",
            "no claim reads the edges). Statement triggers refuse bad keys, actions outside",
            "`private.catalogue_actions` (or on the wrong target, or without a required",
            "confirmation), params over 256 KiB, deeper than 64 levels or out of the catalogue's",
            "bounds; `run_after >= run_at` always. Job status runs pending -> running ->",
            "done / failed / cancelled; an idempotency key is unique per tenant.",
        ],
        "tables": [
            "public.jobs",
            "public.todos",
            "public.todo_edges",
            "private.catalogue_actions",
            "private.job_idempotency",
        ],
        "functions": [
            "private.uuid_v7",
            "private.job_authorized",
            "cpa.job_create",
            "cpa.job_submit",
            "private.job_submit_as",
            "cpa.job_attach",
            "private.todos_insert",
            "cpa.job_trace",
            "cpa.idempotency_check",
            "private.todos_check_insert",
            "private.todo_edges_check_insert",
            "private.jsonb_depth",
            "private.params_violation",
            "cpa.job_route",
        ],
    },
    {
        "file": "20_claims.sql",
        "title": "Claims and leases: who runs a ready ToDo, and the gates that order writers",
        "invariants": [
            "A claim leases ready, due ToDos of one target (fair across tenants, capped per",
            "tenant) to one owner until `lease_expires_at`; an expired lease goes back to ready",
            "(or fails for good past its retries) before the claim looks. Lock order for every",
            "writer: the per-job gate (advisory lock class 1785; completions shared, everything",
            "else exclusive), then job rows, then ToDo rows, in ascending id, then the events",
            "flush's bucket locks at commit. Desktop agents hold leases as `agent:<key>`",
            "(`private.agent_owner_v1`).",
        ],
        "tables": ["public.agents"],
        "functions": [
            "cpa.todo_claim",
            "private.todo_claim_pick",
            "private.todo_expire",
            "private.todos_start",
            "private.lost_lease_limit",
            "cpa.agent_claim",
            "cpa.agent_upsert",
            "private.agent_owner",
            "private.agent_bind",
            "private.agent_wake",
            "private.agent_items",
            "cpa.job_gate",
            "private.job_gate_key",
            "private.job_gate_try",
            "private.todo_jobs_gate",
            "private.todo_jobs_lock",
            "cpa.todo_extend",
            "cpa.todo_snooze",
            "cpa.todo_lease_owners",
            "cpa.todo_reclaim_dead",
            "cpa.desktop_sweep",
            "private.todos_reset_agent_notice",
        ],
    },
    {
        "file": "30_completion.sql",
        "title": "Completion: finishing, failing, releasing, cancelling and retrying work",
        "invariants": [
            "Complete, fail and release act only on the exact lease owner's running ToDos (a",
            "null owner matches nothing), fenced by attempt; completing releases dependents and",
            "counts the job's done ToDos, finishing the job with its last one. A failure past its",
            "retries fails the job and cancels what has not run; cancel and retry act on the",
            "whole job. Every one of these takes the lock order of 20_claims.sql.",
        ],
        "functions": [
            "cpa.todo_complete",
            "cpa.todo_complete_claim",
            "cpa.todo_fail",
            "cpa.todo_release",
            "cpa.todo_confirm",
            "cpa.agent_complete",
            "cpa.agent_fail",
            "cpa.agent_release",
            "private.todo_dependents_release",
            "private.job_counts_add",
            "private.todo_fail_terminal",
            "cpa.job_cancel",
            "cpa.job_retry",
        ],
    },
    {
        "file": "40_events_and_realtime.sql",
        "title": "Events and Realtime: the append-only progress log and its broadcasts",
        "invariants": [
            "`job_events` is append-only. Writers stage events in the transaction; one deferred",
            "trigger flushes them at commit under per-bucket advisory locks taken in ascending",
            "order, so the ids of one job become visible in id order (readers resume by id) and",
            "flushes cannot deadlock. Each flush sends the broadcasts (`realtime.send`, private",
            "topics: `tenant:<t>` for the tenant's owners and admins, `tenant:<t>:user:<u>` for the",
            "jobs user u owns, `tenant:<t>:agents:<u>` for u's desktop wake-ups); the policies on",
            "`realtime.messages` (`private.realtime_topic_allowed_v1`) let a member join only",
            "their own topics and an owner or admin the tenant's.",
        ],
        "tables": [
            "public.job_events",
            "private.job_events_legacy",
            "private.job_events_default",
            "private.job_events_staged",
            "private.job_events_flush",
            "realtime.messages",
        ],
        "types": ["private.job_event_draft"],
        "functions": [
            "private.job_events_flush",
            "private.realtime_topic_allowed",
            "private.job_events_stage",
            "private.job_events_restage",
            "private.jobs_events",
            "private.todos_events",
            "private.jobs_delete_events",
            "cpa.todo_note",
        ],
    },
    {
        "file": "50_schedules.sql",
        "title": "Schedules: recurring jobs",
        "invariants": [
            "A schedule belongs to a tenant and fires at most one job per occurrence: jobs carry",
            "(schedule_id, scheduled_for), unique together.",
        ],
        "tables": ["public.schedules"],
        "functions": [
            "private.schedule_authorized",
            "cpa.schedule_create",
            "cpa.schedule_pause",
            "cpa.schedule_delete",
            "cpa.schedule_fire",
        ],
    },
    {
        "file": "60_audit.sql",
        "title": "Audit: who changed what",
        "invariants": [
            "`audit_log` is written only by triggers (who, what, which entity, before and",
            "after); an update, delete or truncate of it raises for every role, except the",
            "retention prune's own delete (`cpa.audit_prune`, set inside",
            "`cpa.retention_prune_v1`), which is itself audited.",
        ],
        "tables": ["public.audit_log", "private.audit_log_legacy", "private.audit_log_default"],
        "functions": [
            "private.audit_write",
            "private.audit_forbid_change",
            "private.todo_agent_audit",
        ],
    },
    {
        "file": "70_limits_and_caches.sql",
        "title": "Limits and caches: rate limits and the planner's cache",
        "invariants": [
            "A tenant's requests count in fixed windows (`private.rate_limits`, one row a key",
            "and window); planner answers are cached per tenant until `expires_at`.",
        ],
        "tables": ["private.rate_limits", "private.plan_cache"],
        "functions": ["cpa.rate_limit_hit", "cpa.plan_cache_get", "cpa.plan_cache_put"],
    },
    {
        "file": "80_retention.sql",
        "title": "Retention: pruning finished jobs and old audit rows",
        "invariants": [
            "One bounded batch each: events older than the job window (of any job), finished",
            "jobs older than it with their ToDos, edges and events, idempotency keys, and audit",
            "rows older than the audit window; run it again until it prunes nothing.",
        ],
        "functions": [
            "cpa.retention_prune",
            "cpa.partitions_ensure",
            "private.partition_bounds",
            "private.partition_create",
        ],
    },
]

# pg_dump's settings and psql meta-commands: the files hold definitions only.
_NOISE = re.compile(r"^(SET |SELECT pg_catalog\.set_config|\\)")
_HEADER = re.compile(r"^-- Name: (.*); Type: (.*); Schema: (.*); Owner: .*$")
_VERSION = re.compile(r"_v\d+$")


@dataclass(frozen=True)
class Entry:
    kind: str  # pg_dump's type: TABLE, FUNCTION, ACL, INDEX, ...
    schema: str
    name: str
    sql: str


def parse_dump(text: str) -> list[Entry]:
    """pg_dump's plain output as its entries, in pg_dump's (dependency) order."""
    entries: list[Entry] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = _HEADER.match(lines[i])
        if not match:
            i += 1
            continue
        body: list[str] = []
        i += 2  # the closing "--" of the header block
        while i < len(lines) and not (
            lines[i] == "--" and i + 1 < len(lines) and _HEADER.match(lines[i + 1])
        ):
            if not _NOISE.match(lines[i]):
                body.append(lines[i])
            i += 1
        name, kind, schema = match.groups()
        entries.append(Entry(kind, schema, name, "\n".join(body).strip()))
    return entries


def _subject_index() -> tuple[dict[str, int], dict[str, int], dict[str, int], dict[str, int]]:
    tables: dict[str, int] = {}
    functions: dict[str, int] = {}
    types: dict[str, int] = {}
    schemas: dict[str, int] = {}
    for number, subject in enumerate(SUBJECTS):
        for key, into in (("tables", tables), ("functions", functions), ("types", types),
                          ("schemas", schemas)):  # fmt: skip
            for name in subject.get(key, []):  # type: ignore[attr-defined]
                into[name] = number
    return tables, functions, types, schemas


def _function_family(schema: str, signature: str) -> str:
    return f"{schema}.{_VERSION.sub('', signature.split('(', 1)[0])}"


def classify(entry: Entry, indexes: dict[str, str]) -> int:
    """The number of the subject that holds ``entry`` (``indexes``: each index's table); exits
    naming an object no subject claims."""
    tables, functions, types, schemas = _subject_index()
    kind, schema, name, text = entry.kind, entry.schema, entry.name, entry.sql

    def table(qualified: str) -> int:
        if qualified in tables:
            return tables[qualified]
        raise LookupError(f"table {qualified}")

    def function(family: str) -> int:
        if family in functions:
            return functions[family]
        raise LookupError(f"function {family} (any _vN)")

    try:
        if kind == "SCHEMA" or (kind in ("ACL", "COMMENT") and name.startswith("SCHEMA ")):
            target = name.removeprefix("SCHEMA ")
            if target in schemas:
                return schemas[target]
            raise LookupError(f"schema {target}")
        if kind == "FUNCTION":
            return function(_function_family(schema, name))
        if kind in ("ACL", "COMMENT") and name.startswith("FUNCTION "):
            return function(_function_family(schema, name.removeprefix("FUNCTION ")))
        if kind == "TYPE" or name.startswith("TYPE "):
            qualified = f"{schema}.{name.removeprefix('TYPE ')}"
            if qualified in types:
                return types[qualified]
            raise LookupError(f"type {qualified}")
        if kind == "TRIGGER":
            runs = re.search(r"EXECUTE FUNCTION ([\w.]+)\(", text)
            assert runs, text
            family = _VERSION.sub("", runs.group(1))
            return function(family)
        if kind == "INDEX ATTACH":
            # A partition's index attached to its parent's: with the parent table's subject.
            parent = re.search(r"ALTER INDEX ([\w.]+) ATTACH", text)
            assert parent, text
            owner = indexes.get(parent.group(1))
            if owner is None:
                first = parent.group(1).split(".")[1].split("_")
                owner = next((t for t in tables if t.split(".")[1] in "_".join(first)), "")
            return table(owner)
        if name.startswith("INDEX "):
            return table(indexes[f"{schema}.{name.removeprefix('INDEX ')}"])
        if kind == "INDEX":
            return table(indexes[f"{schema}.{name}"])
        if kind in ("SEQUENCE", "SEQUENCE OWNED BY") or name.startswith("SEQUENCE "):
            # Named <table>_<column>_seq by serial columns.
            sequence = name.removeprefix("SEQUENCE ")
            owners = [t for t in tables if sequence.startswith(t.split(".")[1] + "_")]
            if owners:
                return table(max(owners, key=len))
            raise LookupError(f"sequence {schema}.{sequence}")
        if kind == "FK CONSTRAINT":
            # With the later of the two tables' subjects, so both exist when it is added.
            references = re.search(r"REFERENCES ([\w.]+)\(", text)
            assert references, text
            own = table(f"{schema}.{name.split(' ')[0]}")
            target = references.group(1)
            if target.split(".")[0] not in SCHEMAS:  # the bootstrap's (auth.users)
                return own
            return max(own, table(target))
        # Everything else is on a table: its name leads the entry's name.
        first = name.removeprefix("TABLE ").removeprefix("COLUMN ").removeprefix("POLICY ")
        first = first.split(" ")[0].split(".")[0]
        return table(f"{schema}.{first}")
    except LookupError as exc:
        raise SystemExit(
            f"supabase/schemas: no subject claims {exc} (pg_dump entry {kind} {schema}.{name}); "
            "add it to SUBJECTS in scripts/schemas.py and run `python scripts/schemas.py write`."
        ) from None


def _label(entry: Entry) -> str:
    """``TABLE public.jobs``, ``ACL on FUNCTION cpa.todo_claim_v3(...)``: what an entry is."""
    keyword, _, rest = entry.name.partition(" ")
    if entry.kind in ("ACL", "COMMENT") and rest:
        where = "" if entry.schema == "-" else f"{entry.schema}."
        return f"{entry.kind} on {keyword} {where}{rest}"
    return f"{entry.kind} {'' if entry.schema == '-' else entry.schema + '.'}{entry.name}"


def _anchor(entry: Entry, indexes: dict[str, str]) -> str | None:
    """The object an entry belongs beside (its table, or the function it grants or comments
    on), so a reader finds a table's keys and indexes, a function's grants, right after it.
    None for an entry that stands alone (a function, a table, a policy, a trigger)."""
    keyword, _, rest = entry.name.partition(" ")
    if entry.kind in ("ACL", "COMMENT") and keyword == "SCHEMA":
        return f"schema {rest}"
    if entry.kind in ("ACL", "COMMENT") and keyword == "FUNCTION":
        return f"function {entry.schema}.{rest.split('(')[0]}"
    if entry.kind in ("ACL", "COMMENT") and keyword in ("TABLE", "COLUMN", "TYPE"):
        return f"table {entry.schema}.{rest.split('.')[0]}"
    if entry.kind in ("ACL", "COMMENT") and keyword == "INDEX":
        return f"table {indexes[f'{entry.schema}.{rest}']}"
    if entry.kind == "INDEX":
        return f"table {indexes[f'{entry.schema}.{entry.name}']}"
    if entry.kind in ("SEQUENCE", "SEQUENCE OWNED BY") or keyword == "SEQUENCE":
        owned = re.search(r"OWNED BY ([\w.]+)\.\w+;", entry.sql)
        return (
            f"sequence {entry.schema}.{entry.name.removeprefix('SEQUENCE ')}"
            if not owned
            else (f"table {owned.group(1)}")
        )
    # Policies, triggers, check and foreign keys may call a function or read a table defined
    # later in the file: they keep pg_dump's place, after the file's tables and functions.
    if entry.kind in ("CONSTRAINT", "DEFAULT", "ROW SECURITY"):
        return f"table {entry.schema}.{keyword}"
    return None


def _key(entry: Entry) -> str | None:
    """The anchor name an entry answers to, if others can belong beside it."""
    if entry.kind == "SCHEMA":
        return f"schema {entry.name}"
    if entry.kind == "FUNCTION":
        return f"function {entry.schema}.{entry.name.split('(')[0]}"
    if entry.kind in ("TABLE", "TYPE"):
        return f"table {entry.schema}.{entry.name}"
    return None


def render(entries: list[Entry]) -> dict[str, str]:
    """The files of ``supabase/schemas/`` for the entries the migrations added: each subject's
    objects in pg_dump's (dependency) order, each followed by what belongs beside it."""
    indexes = {}
    for entry in entries:
        on = re.search(r" ON (?:ONLY )?([\w.]+)", entry.sql)
        if entry.kind == "INDEX" and on:
            indexes[f"{entry.schema}.{entry.name}"] = on.group(1)
    subject_of = {entry: classify(entry, indexes) for entry in entries}
    # A sequence's own entries go with its table (SEQUENCE OWNED BY names it).
    sequences = {
        f"sequence {e.schema}.{e.name}": a
        for e in entries
        if e.kind == "SEQUENCE OWNED BY" and (a := _anchor(e, indexes))
    }
    heads: dict[str, Entry] = {}
    for entry in entries:
        key = _key(entry)
        if key:
            heads[key] = entry  # the last of overloads: its grants follow every one of them
    beside: dict[Entry, list[Entry]] = {}
    alone: list[Entry] = []
    for entry in entries:
        anchor = _anchor(entry, indexes)
        anchor = sequences.get(anchor or "", anchor)
        head = heads.get(anchor or "")
        if head is not None and subject_of[head] == subject_of[entry] and head is not entry:
            beside.setdefault(head, []).append(entry)
        else:
            alone.append(entry)
    chunks: dict[int, list[str]] = {number: [] for number in range(len(SUBJECTS))}
    for entry in alone:
        group = [entry, *beside.get(entry, [])]
        chunks[subject_of[entry]].append("\n".join(f"-- {_label(e)}\n{e.sql}" for e in group))
    files = {}
    for number, subject in enumerate(SUBJECTS):
        invariants = "\n".join(f"-- {line}" for line in subject["invariants"])  # type: ignore[attr-defined]
        head_text = (
            f"-- {subject['title']}\n--\n{invariants}\n--\n"
            "-- Generated from supabase/migrations by scripts/schemas.py; edit a migration (and\n"
            "-- the header in that script), then run `python scripts/schemas.py write`.\n\n"
            # pg_dump orders functions before the tables their SQL bodies read.
            "set check_function_bodies = false;\n"
        )
        files[str(subject["file"])] = head_text + "".join(f"\n{c}\n" for c in chunks[number])
    return files


# -- servers and databases ------------------------------------------------------------------------


@contextmanager
def server(url: str | None) -> Iterator[tuple[str, Path | None]]:
    """A superuser URL (to database postgres) and the directory of its pg_dump, if known."""
    if url:
        yield url, None
        return
    with tempfile.TemporaryDirectory(prefix="cpa-schemas-") as tmp:
        pg = embedded.EmbeddedPostgres(Path(tmp), durable=False)
        pg.start()
        try:
            yield pg.url(user=embedded.SUPERUSER), embedded._wheel_bin_dir()
        finally:
            pg.stop()


def _url(admin: str, database: str, user: str | None = None) -> str:
    params = conninfo_to_dict(admin)
    params["dbname"] = database
    if user:
        params["user"] = user
    return make_conninfo(**params)


def _uri(admin: str, database: str) -> str:
    """A postgresql:// URL of ``database`` (the Supabase CLI takes no key=value strings)."""
    p = conninfo_to_dict(_url(admin, database))
    password = f":{p['password']}" if p.get("password") else ""
    return (
        f"postgresql://{p.get('user', '')}{password}@{p.get('host', '127.0.0.1')}:"
        f"{p.get('port', 5432)}/{database}?sslmode=disable"
    )


@contextmanager
def database(admin: str) -> Iterator[str]:
    """A new, bootstrapped database (its name); dropped afterwards."""
    name = f"cpa_schemas_{uuid.uuid4().hex[:10]}"
    migration.bootstrap(_url(admin, "postgres"))  # roles are cluster-wide
    with psycopg.connect(_url(admin, "postgres"), autocommit=True) as conn:
        conn.execute(f'create database "{name}" owner "{APP_USER}"')  # type: ignore[arg-type]
    try:
        migration.bootstrap(_url(admin, name))
        yield name
    finally:
        with psycopg.connect(_url(admin, "postgres"), autocommit=True) as conn:
            conn.execute(f'drop database if exists "{name}" with (force)')  # type: ignore[arg-type]


def files() -> list[Path]:
    """The schema files in the order they apply."""
    return sorted(SCHEMAS_DIR.glob("*.sql"))


def apply_files(url: str, paths: list[Path]) -> None:
    """Run the schema files in order, each in one transaction (as the migrations run)."""
    with psycopg.connect(url) as conn:
        for path in paths:
            try:
                with conn.transaction():
                    conn.execute(path.read_text("utf-8"))  # type: ignore[arg-type]
            except psycopg.Error as exc:
                raise SystemExit(f"supabase/schemas/{path.name} failed: {exc}") from None


def dump(admin: str, database: str, pg_bin: Path | None) -> list[Entry]:
    pg_dump = str(pg_bin / "pg_dump") if pg_bin else "pg_dump"
    done = subprocess.run(
        [pg_dump, "--schema-only", "--no-owner", "--exclude-schema=supabase_migrations",
         "--dbname", _url(admin, database)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return parse_dump(done.stdout)


# -- the catalogue both builds are compared by -----------------------------------------------------

SCHEMAS = ["public", "private", "cpa"]

# Each query answers (object, definition) rows; ``object`` names what a difference is about.
CATALOGUE = {
    "column": """
        select format('column %%s.%%s.%%s', n.nspname, c.relname, a.attname),
               format('%%s%%s%%s', format_type(a.atttypid, a.atttypmod),
                      case when a.attnotnull then ' not null' else '' end,
                      coalesce(' default ' || pg_get_expr(d.adbin, d.adrelid), ''))
          from pg_attribute a join pg_class c on c.oid = a.attrelid
          join pg_namespace n on n.oid = c.relnamespace
          left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
         where n.nspname = any(%(schemas)s) and c.relkind in ('r', 'p', 'v', 'c')
           and a.attnum > 0 and not a.attisdropped""",
    "relation": """
        select format('%%s %%s.%%s', case c.relkind when 'S' then 'sequence' when 'c' then 'type'
                                  else 'table' end, n.nspname, c.relname),
               format('kind=%%s persistence=%%s rls=%%s force=%%s grants=%%s', c.relkind,
                      c.relpersistence, c.relrowsecurity, c.relforcerowsecurity,
                      (select string_agg(g.grantee::regrole::text || ':' || g.privilege_type,
                                         ',' order by g.grantee::regrole::text, g.privilege_type)
                         from (select (aclexplode(c.relacl)).*) g
                        -- the owner's own rights differ between versions (MAINTAIN in 17+)
                        where g.grantee not in (0, c.relowner)
                          and g.grantee::regrole::text <> 'supabase_admin'))
          from pg_class c join pg_namespace n on n.oid = c.relnamespace
         where n.nspname = any(%(schemas)s) and c.relkind in ('r', 'p', 'v', 'S', 'c')""",
    "constraint": """
        select format('constraint %%s.%%s.%%s', n.nspname, c.relname, k.conname),
               pg_get_constraintdef(k.oid)
          from pg_constraint k join pg_class c on c.oid = k.conrelid
          join pg_namespace n on n.oid = c.relnamespace
         where n.nspname = any(%(schemas)s)
           and k.contype <> 'n'  -- PostgreSQL 18 lists NOT NULL here too; columns show it""",
    "index": """
        select format('index %%s.%%s', n.nspname, ic.relname), pg_get_indexdef(i.indexrelid)
          from pg_index i join pg_class c on c.oid = i.indrelid
          join pg_class ic on ic.oid = i.indexrelid
          join pg_namespace n on n.oid = c.relnamespace
         where n.nspname = any(%(schemas)s)""",
    "function": """
        select format('function %%s', p.oid::regprocedure),
               format('%%s grants=%%s', pg_get_functiondef(p.oid),
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
        select format('policy %%s.%%s "%%s"', schemaname, tablename, policyname),
               format('%%s for %%s to %%s using (%%s) check (%%s)', permissive, cmd,
                      array_to_string(roles, ','), coalesce(qual, ''), coalesce(with_check, ''))
          from pg_policies where schemaname = any(%(schemas)s || '{realtime}'::text[])""",
    "trigger": """
        select format('trigger %%s.%%s.%%s', n.nspname, c.relname, t.tgname),
               format('%%s enabled=%%s', pg_get_triggerdef(t.oid), t.tgenabled)
          from pg_trigger t join pg_class c on c.oid = t.tgrelid
          join pg_namespace n on n.oid = c.relnamespace
         where n.nspname = any(%(schemas)s) and not t.tgisinternal""",
    "schema": """
        select format('schema %%s', n.nspname),
               format('grants=%%s comment=%%s',
                      (select string_agg(case when g.grantee = 0 then 'public'
                                              else g.grantee::regrole::text end
                                         || ':' || g.privilege_type, ',' order by 1)
                         from (select (aclexplode(n.nspacl)).*) g
                        where g.grantee <> n.nspowner),
                      obj_description(n.oid, 'pg_namespace'))
          from pg_namespace n where n.nspname = any(%(schemas)s)""",
    "comment": """
        select format('comment on %%s', pg_describe_object(d.classoid, d.objoid, d.objsubid)),
               d.description
          from pg_description d
          join pg_namespace n on n.oid = coalesce(
                 (select relnamespace from pg_class where oid = d.objoid
                   and d.classoid = 'pg_class'::regclass),
                 (select pronamespace from pg_proc where oid = d.objoid
                   and d.classoid = 'pg_proc'::regclass),
                 (select typnamespace from pg_type where oid = d.objoid
                   and d.classoid = 'pg_type'::regclass))
         where n.nspname = any(%(schemas)s)""",
}


def catalogue(url: str) -> dict[str, str]:
    """Every object of our schemas, by name, with its definition (function bodies whole)."""
    found: dict[str, str] = {}
    with psycopg.connect(url) as conn:
        for query in CATALOGUE.values():
            for name, definition in conn.execute(query, {"schemas": SCHEMAS}):  # type: ignore[arg-type]
                if not DATED_PARTITION.search(str(name)):
                    found[str(name)] = str(definition)
    return found


def differences(expected: dict[str, str], actual: dict[str, str]) -> list[str]:
    """Objects missing, extra or defined otherwise in ``actual`` (from the schema files)."""
    out = []
    for name in sorted(expected.keys() | actual.keys()):
        if name not in actual:
            out.append(f"{name}: built by the migrations, missing from supabase/schemas")
        elif name not in expected:
            out.append(f"{name}: in supabase/schemas, not built by the migrations")
        elif expected[name] != actual[name]:
            out.append(
                f"{name} differs:\n  migrations: {expected[name]}\n  schemas:    {actual[name]}"
            )
    return out


def build_both(admin: str) -> tuple[dict[str, str], dict[str, str]]:
    """The catalogues of a database from the migrations and of one from supabase/schemas."""
    with database(admin) as migrated, database(admin) as declared:
        migration.apply(_url(admin, migrated, APP_USER))
        apply_files(_url(admin, declared, APP_USER), files())
        return catalogue(_url(admin, migrated)), catalogue(_url(admin, declared))


def diff(admin: str) -> int:
    """Print the SQL that takes the migrations' database to supabase/schemas' (the draft of the
    next migration after an edit to a schema file), from the Supabase CLI's ``db diff``."""
    with database(admin) as migrated, database(admin) as declared:
        migration.apply(_url(admin, migrated, APP_USER))
        apply_files(_url(admin, declared, APP_USER), files())
        done = subprocess.run(
            [*SUPABASE_CLI, "db", "diff", "--schema", "public,private,cpa,realtime",
             "--from", _uri(admin, migrated), "--to", _uri(admin, declared)],
            cwd=ROOT, capture_output=True, text=True, check=False,
        )  # fmt: skip
    sys.stdout.write(done.stdout)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
    return done.returncode


# The dated partitions of job_events and audit_log (``<table>_p20261207``): created ahead by
# cpa.partitions_ensure_v1 from the day a database is built, so they are data of that day, not
# definitions. The files leave them out, and the comparison ignores them (and partition bounds).
DATED_PARTITION = re.compile(r"\w_p\d{6,8}(?![0-9])")


def write(admin: str, pg_bin: Path | None) -> None:
    with database(admin) as migrated, database(admin) as bare:
        migration.apply(_url(admin, migrated, APP_USER))
        before = set(dump(admin, bare, pg_bin))
        added = [
            e
            for e in dump(admin, migrated, pg_bin)
            if e not in before and not DATED_PARTITION.search(f"{e.name} {e.sql}")
        ]
    SCHEMAS_DIR.mkdir(exist_ok=True)
    rendered = render(added)
    for stale in {p.name for p in files()} - rendered.keys():
        (SCHEMAS_DIR / stale).unlink()
    for name, text in rendered.items():
        (SCHEMAS_DIR / name).write_text(text)
    print(f"wrote {len(rendered)} files, {len(added)} objects, to {SCHEMAS_DIR}")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("command", choices=["write", "check", "diff"])
    parser.add_argument("--url", help="a superuser URL to another server (default: embedded)")
    parser.add_argument("--pg-bin", type=Path, help="directory of the pg_dump to use")
    args = parser.parse_args()
    with server(args.url) as (admin, pg_bin):
        if args.command == "diff":
            return diff(admin)
        if args.command == "write":
            write(admin, args.pg_bin or pg_bin)
            expected, actual = build_both(admin)
        else:
            expected, actual = build_both(admin)
    wrong = differences(expected, actual)
    for line in wrong:
        print(line, file=sys.stderr)
    if wrong:
        print(f"supabase/schemas differs from the migrations in {len(wrong)} objects; run "
              "`python scripts/schemas.py write`", file=sys.stderr)  # fmt: skip
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
