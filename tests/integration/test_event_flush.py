"""Progress events are flushed at commit (issue 15, migration ``…_events_flush``).

Writers stage their events in the transaction; one deferred constraint trigger per transaction
locks the transaction's jobs (advisory, sorted), gives the events their ids, inserts them and
sends one broadcast per tenant. So the ids of one job commit in id order, and a reader that
resumes by id (SSE ``Last-Event-ID``, ``?after=``) never skips an event.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import psycopg
from cpa_scheduler import store

from tests import events_contract
from tests.conftest import JobFactory, MemberFactory

NOOPS = [{"key": k, "action": "noop"} for k in ("a", "b")]


def _todos(conn: psycopg.Connection[Any], job_id: Any) -> dict[str, Any]:
    rows = conn.execute("select key, id from public.todos where job_id = %s", (job_id,)).fetchall()
    return {str(key): todo_id for key, todo_id in rows}


def _start(conn: psycopg.Connection[Any], todo_id: Any, owner: str) -> None:
    """One status change of one ToDo (ready -> running), as a claim makes it."""
    conn.execute(
        "update public.todos set status = 'running', lease_owner = %s,"
        " lease_expires_at = now() + interval '1 minute', attempts = attempts + 1,"
        " started_at = now() where id = %s",
        (owner, todo_id),
    )


def _after(db_url: str, job_id: Any, after: int) -> list[int]:
    """What GET /v1/jobs/{id}/events?after= reads (the store's event_list)."""
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "select id from public.job_events where job_id = %s and id > %s order by id",
            (job_id, after),
        ).fetchall()
    return [r[0] for r in rows]


def _last(db_url: str, job_id: Any) -> int:
    ids = _after(db_url, job_id, 0)
    return ids[-1] if ids else 0


def _residue(db_url: str) -> tuple[int, int]:
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "select (select count(*) from private.job_events_staged),"
            " (select count(*) from private.job_events_flush)"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def _messages(db_url: str, topic: str) -> list[dict[str, Any]]:
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "select payload from realtime.messages where topic = %s order by inserted_at", (topic,)
        ).fetchall()
    return [r[0] for r in rows]


async def test_a_reader_resuming_by_id_never_skips_an_earlier_transaction(
    db_url: str, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    """The old gap: T1 writes an event of job J, T2 writes a later one of J and commits first.

    Before the flush, T1's row took its id when T1 wrote it, so T2's id was higher and a reader
    resuming after T2's id never saw T1's event. Now T1's event gets its id when T1 commits.
    """
    m = await member_factory()
    job = await job_factory(m, NOOPS)
    start = _last(db_url, job.id)
    with psycopg.connect(db_url) as t1, psycopg.connect(db_url) as t2:
        todo = _todos(t1, job.id)
        t1.commit()
        _start(t1, todo["a"], "t1")  # T1 writes its event and stays open
        _start(t2, todo["b"], "t2")
        t2.commit()  # T2 commits first
        seen = _after(db_url, job.id, start)  # a reader polls between the two commits
        assert seen, "T2's event is visible"
        t1.commit()
    seen += _after(db_url, job.id, seen[-1])  # ... and resumes after the last id it saw
    assert seen == _after(db_url, job.id, start), "the resumed reader skipped an event"
    assert len(seen) == 2  # a running (T1) and b running (T2)


async def test_a_later_commit_of_the_same_job_waits_for_the_flushed_one(
    db_url: str, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    """T1 has flushed (its ids are taken, it holds J's lock) but not committed: T2 must wait
    for T1's commit before it takes ids of J, so ids of J commit in id order."""
    m = await member_factory()
    job = await job_factory(m, NOOPS)
    start = _last(db_url, job.id)
    with psycopg.connect(db_url) as t1, psycopg.connect(db_url) as t2:
        todo = _todos(t1, job.id)
        t1.commit()
        _start(t1, todo["a"], "t1")
        t1.execute("set constraints all immediate")  # flush now: ids taken, lock held
        _start(t2, todo["b"], "t2")
        done = threading.Event()
        errors: list[BaseException] = []

        def commit_t2() -> None:
            try:
                t2.commit()
            except BaseException as exc:  # surfaced below
                errors.append(exc)
            finally:
                done.set()

        thread = threading.Thread(target=commit_t2)
        thread.start()
        deadline = time.monotonic() + 10
        waiting = False
        while time.monotonic() < deadline and not waiting:
            with psycopg.connect(db_url, autocommit=True) as probe:
                row = probe.execute(
                    "select count(*) from pg_locks where pid = %s and not granted"
                    " and locktype = 'advisory'",
                    (t2.info.backend_pid,),
                ).fetchone()
            waiting = bool(row and row[0])
            if not waiting:
                time.sleep(0.02)
        assert waiting, "T2's commit does not wait for T1's job lock"
        assert not done.is_set()
        assert _after(db_url, job.id, start) == []  # nothing of either is visible yet
        t1.commit()
        thread.join(10)
        assert done.is_set() and not errors, errors
        with psycopg.connect(db_url) as conn:
            rows = conn.execute(
                "select id, todo_id from public.job_events where job_id = %s and id > %s"
                " and todo_id is not null order by id",
                (job.id, start),
            ).fetchall()
    assert [r[1] for r in rows] == [todo["a"], todo["b"]]  # T1's id is the lower one


async def test_one_transaction_sends_one_broadcast_per_tenant(
    db_url: str, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    """Many ToDos of one tenant, changed by several statements (and two jobs, and a note) in one
    transaction: one message with all of its events, in id order, each as the contract says."""
    a = await member_factory("A")
    b = await member_factory("B")
    ten = [{"key": f"t{i}", "action": "noop"} for i in range(10)]
    jobs = [await job_factory(a, ten), await job_factory(a, ten), await job_factory(b, NOOPS)]
    topic_a, topic_b = f"tenant:{a.tenant_id}", f"tenant:{b.tenant_id}"
    before_a, before_b = len(_messages(db_url, topic_a)), len(_messages(db_url, topic_b))
    with psycopg.connect(db_url) as conn:
        ids = [j.id for j in jobs]
        conn.execute(
            "update public.todos set status = 'running', lease_owner = 'w',"
            " lease_expires_at = now() + interval '1 minute', attempts = 1 where job_id = any(%s)",
            (ids,),
        )
        conn.execute(
            "update public.todos set status = 'done', result = '{}'::jsonb,"
            " lease_owner = null, lease_expires_at = null where job_id = %s",
            (ids[0],),
        )
        conn.execute("update public.jobs set status = 'running' where id = any(%s)", (ids,))
        conn.execute(
            "select cpa.todo_note_v1(id, 'notification', '{\"message\": \"hi\"}') from public.todos"
            " where job_id = %s and key = 't0'",
            (ids[1],),
        )
    sent_a = _messages(db_url, topic_a)[before_a:]
    sent_b = _messages(db_url, topic_b)[before_b:]
    assert len(sent_a) == 1 and len(sent_b) == 1
    events = sent_a[0]["events"]
    # 20 running, 10 done, 2 jobs running, 1 note
    assert len(events) == 33
    assert [e["id"] for e in events] == sorted(e["id"] for e in events)
    for e in events + sent_b[0]["events"]:
        events_contract.validate(e)
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "select id from public.job_events where tenant_id = %s and id >= %s order by id",
            (a.tenant_id, events[0]["id"]),
        ).fetchall()
    assert [r[0] for r in rows] == [e["id"] for e in events]  # the broadcast holds the rows
    assert _residue(db_url) == (0, 0)


async def test_a_large_transaction_is_cut_into_messages_by_size(
    db_url: str, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    """The Free plan caps a broadcast at 256 KB: messages hold about 100 kB (plus one event)."""
    m = await member_factory()
    job = await job_factory(m, [{"key": f"t{i}", "action": "noop"} for i in range(8)])
    topic = f"tenant:{m.tenant_id}"
    before = len(_messages(db_url, topic))
    with psycopg.connect(db_url) as conn:
        conn.execute(
            "update public.todos set status = 'done', result = jsonb_build_object('blob',"
            " repeat(md5(key), 1000)) where job_id = %s",  # 32 kB each
            (job.id,),
        )
    sent = _messages(db_url, topic)[before:]
    assert 2 <= len(sent) <= 4
    sizes = [[len(json.dumps(e)) for e in p["events"]] for p in sent]
    assert all(sum(s[:-1]) <= 110_000 for s in sizes)
    events = [e for p in sent for e in p["events"]]
    assert len(events) == 8
    assert [e["id"] for e in events] == sorted(e["id"] for e in events)
    assert _after(db_url, job.id, events[0]["id"] - 1) == [e["id"] for e in events]


async def test_rollback_and_commit_leave_no_staged_residue(
    db_url: str, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    job = await job_factory(m, NOOPS)
    start = _last(db_url, job.id)
    topic = f"tenant:{m.tenant_id}"
    sent = len(_messages(db_url, topic))
    with psycopg.connect(db_url) as conn:
        todo = _todos(conn, job.id)
        conn.commit()
        _start(conn, todo["a"], "w")
        conn.execute(
            "insert into public.job_events (tenant_id, job_id, todo_id, kind, data)"
            " values (%s, %s, %s, 'todo.output', '{}')",
            (m.tenant_id, job.id, todo["a"]),
        )
        row = conn.execute(
            "select (select count(*) from private.job_events_staged where txid = pg_current_xact_id()),"
            " (select count(*) from private.job_events_flush where txid = pg_current_xact_id()),"
            " (select count(*) from public.job_events where job_id = %s and id > %s)",
            (job.id, start),
        ).fetchone()
        assert row == (2, 1, 0)  # staged (status change and insert), armed, no row yet
        conn.rollback()
        with conn.transaction():
            # The transaction's first staging (and its marker) in a savepoint that rolls back:
            # the next staging must arm the flush again.
            with conn.transaction(force_rollback=True):
                _start(conn, todo["b"], "w")
            _start(conn, todo["a"], "w")
    assert _residue(db_url) == (0, 0)
    ids = _after(db_url, job.id, start)
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "select todo_id, status from public.job_events where id = any(%s) and todo_id is not null",
            (ids,),
        ).fetchall()
    assert rows == [(todo["a"], "running")]  # b's change was rolled back with its savepoint
    assert len(_messages(db_url, topic)) == sent + 1
    # A crash empties both tables: they are unlogged.
    with psycopg.connect(db_url) as conn:
        kinds = conn.execute(
            "select relname, relpersistence from pg_class where oid in"
            " ('private.job_events_staged'::regclass, 'private.job_events_flush'::regclass)"
        ).fetchall()
    assert sorted(kinds) == [("job_events_flush", "u"), ("job_events_staged", "u")]


async def test_direct_appends_get_their_ids_at_commit(
    db: store.Store, db_url: str, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    """An executor's emit (service role, plain insert) and an agent's note are staged too."""
    m = await member_factory()
    job = await job_factory(m, NOOPS)
    start = _last(db_url, job.id)
    with psycopg.connect(db_url) as conn:
        todo_id = _todos(conn, job.id)["a"]
    async with db.service() as s:
        await s.event_append(
            tenant_id=m.tenant_id, job_id=job.id, todo_id=todo_id, kind="todo.output",
            data={"text": "partial"},
        )  # fmt: skip
    async with db.user(m.claims) as s:
        await s.todo_note(todo_id, "notification", {"text": "note"})
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "select kind, data from public.job_events where job_id = %s and id > %s order by id",
            (job.id, start),
        ).fetchall()
    assert rows == [("todo.output", {"text": "partial"}), ("notification", {"text": "note"})]
    assert _residue(db_url) == (0, 0)
    payloads = _messages(db_url, f"tenant:{m.tenant_id}")
    # one transaction each, so one message each
    assert [[e["kind"] for e in p["events"]] for p in payloads[-2:]] == [
        ["todo.output"],
        ["notification"],
    ]


async def test_a_job_deleted_in_the_same_transaction_leaves_no_events(
    db_url: str, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    m = await member_factory()
    job = await job_factory(m, NOOPS)
    with psycopg.connect(db_url) as conn:
        todo = _todos(conn, job.id)
        _start(conn, todo["a"], "w")
        conn.execute("delete from public.jobs where id = %s", (job.id,))
    assert _after(db_url, job.id, 0) == []
    assert _residue(db_url) == (0, 0)


async def test_a_flush_takes_at_most_1024_locks_however_many_jobs(
    db_url: str, member_factory: MemberFactory
) -> None:
    """Locks are per bucket of jobs: a transaction touching 3,000 jobs must not need 3,000
    slots of the shared lock table (it failed at COMMIT with "out of shared memory")."""
    m = await member_factory()
    with psycopg.connect(db_url) as conn:
        jobs = [r[0] for r in conn.execute(
            "insert into public.jobs (tenant_id) select %s from generate_series(1, 3000)"
            " returning id", (m.tenant_id,)).fetchall()]  # fmt: skip
        conn.execute(
            "insert into public.job_events (tenant_id, job_id, kind, data)"
            " select %s, j, 'notification', '{}' from unnest(%s::uuid[]) j",
            (m.tenant_id, jobs),
        )
        conn.execute("set constraints all immediate")  # runs the deferred flush now
        locks = conn.execute(
            "select count(*) from pg_locks where locktype = 'advisory' and classid = 7263200"
            " and pid = pg_backend_pid()"
        ).fetchone()
        assert locks is not None and 0 < locks[0] <= 1024
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "select count(*) from public.job_events where job_id = any(%s)"
            " and kind = 'notification'",
            (jobs,),
        ).fetchone()
    assert row == (3000,)
    assert _residue(db_url) == (0, 0)


async def test_setting_the_flush_flag_does_not_skip_the_stage(
    db_url: str, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    """cpa.events_flushing is a setting any session can set; only the flush's own (nested)
    insert may pass, so a writer that sets it still gets its id at commit and a broadcast."""
    m = await member_factory()
    job = await job_factory(m, NOOPS)
    topic = f"tenant:{m.tenant_id}"
    before = len(_messages(db_url, topic))
    with psycopg.connect(db_url) as conn:
        conn.execute("select set_config('cpa.events_flushing', 'on', true)")
        conn.execute(
            "insert into public.job_events (tenant_id, job_id, kind, data)"
            " values (%s, %s, 'notification', '{\"text\": \"forged\"}')",
            (m.tenant_id, job.id),
        )
        staged = conn.execute("select count(*) from private.job_events_staged").fetchone()
        assert staged is not None and staged[0] == 1
    payloads = _messages(db_url, topic)[before:]
    assert [[e["data"] for e in p["events"]] for p in payloads] == [[{"text": "forged"}]]
    assert _residue(db_url) == (0, 0)
