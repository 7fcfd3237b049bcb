"""The database half of Realtime: what the triggers broadcast, and who may receive it.

Hosted Realtime authorizes a private channel by selecting from ``realtime.messages`` as
``authenticated`` with the subscriber's claims and ``realtime.topic`` set to the channel's
topic; these tests select the broadcast rows the same way.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import psycopg
from cpa_scheduler import dispatch, store
from psycopg.rows import dict_row

from tests import events_contract
from tests.conftest import JobFactory, Member, MemberFactory


def _broadcasts(db_url: str) -> list[dict[str, Any]]:
    with psycopg.connect(db_url, row_factory=dict_row) as conn:
        return conn.execute(
            "select id, topic, event, extension, private, payload from realtime.messages"
            " order by inserted_at, (payload -> 'events' -> 0 ->> 'id')::bigint"
        ).fetchall()


def _visible(db_url: str, role: str, claims: dict[str, Any] | None, topic: str) -> set[Any]:
    """The broadcast rows ``role`` may read on ``topic``, as Realtime checks a join."""
    with psycopg.connect(db_url) as conn:
        conn.execute(f"set local role {role}")
        if claims is not None:
            conn.execute("select set_config('request.jwt.claims', %s, true)", (json.dumps(claims),))
        conn.execute("select set_config('realtime.topic', %s, true)", (topic,))
        return {r[0] for r in conn.execute("select id from realtime.messages").fetchall()}


async def _run_jobs(db: store.Store, job_factory: JobFactory, *members: Member) -> None:
    for m in members:
        await job_factory(
            m,
            [{"key": "x", "action": "noop"}, {"key": "y", "action": "noop", "depends_on": ["x"]}]
            + [{"key": f"n{i}", "action": "noop", "depends_on": ["y"]} for i in range(60)],
        )
    await dispatch.Dispatcher(db).run_pass(30)


async def test_every_event_is_broadcast_once_on_its_tenant_topic(
    db_url: str, db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    a, b = await member_factory("A"), await member_factory("B")
    await _run_jobs(db, job_factory, a, b)
    rows = _broadcasts(db_url)
    assert rows
    for m in (a, b):
        mine = [r for r in rows if r["topic"] == f"tenant:{m.tenant_id}"]
        assert all(
            r["event"] == "job_events" and r["extension"] == "broadcast" and r["private"]
            for r in mine
        )
        # 60 ToDos released by one completion: one message per transaction, no longer cut at
        # 50 events (messages are cut by size since …_events_flush).
        assert max(len(r["payload"]["events"]) for r in mine) > 60
        sent = [events_contract.validate(e) for r in mine for e in r["payload"]["events"]]
        assert {e["job_id"] for e in sent} == {
            str(j) for j in await _job_ids(db, m)
        }  # only this tenant's jobs
        async with db.user(m.claims) as s:
            stored = [
                e["id"] for j in await _job_ids(db, m) for e in await s.event_list(j, 0, 1000)
            ]
        assert sorted(e["id"] for e in sent) == sorted(stored)  # each event once
        for r in mine:  # ordered by id inside a message
            ids = [e["id"] for e in r["payload"]["events"]]
            assert ids == sorted(ids)


async def _job_ids(db: store.Store, m: Member) -> list[uuid.UUID]:
    async with db.user(m.claims) as s:
        return [j.id for j in await s.job_list(tenant_id=m.tenant_id, limit=100)]


async def test_a_tenant_receives_only_its_own_topic_and_anon_nothing(
    db_url: str, db: store.Store, member_factory: MemberFactory, job_factory: JobFactory
) -> None:
    a, b = await member_factory("A"), await member_factory("B")
    await _run_jobs(db, job_factory, a, b)
    rows = _broadcasts(db_url)
    by_topic: dict[str, set[Any]] = {}
    for r in rows:
        by_topic.setdefault(r["topic"], set()).add(r["id"])
    topic_a, topic_b = f"tenant:{a.tenant_id}", f"tenant:{b.tenant_id}"
    assert set(by_topic) == {topic_a, topic_b}

    for member, own, other in ((a, topic_a, topic_b), (b, topic_b, topic_a)):
        assert _visible(db_url, "authenticated", member.claims, own) == by_topic[own]
        assert _visible(db_url, "authenticated", member.claims, other) == set()
    stranger = {"sub": str(uuid.uuid4()), "role": "authenticated", "aud": "authenticated"}
    assert _visible(db_url, "authenticated", stranger, topic_a) == set()
    assert _visible(db_url, "anon", None, topic_a) == set()
    assert _visible(db_url, "anon", {"role": "anon"}, topic_b) == set()
