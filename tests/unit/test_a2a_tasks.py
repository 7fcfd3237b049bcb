"""Jobs as A2A tasks: messages read as requests, events turned into stream events."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from a2a.types import a2a_pb2 as pb
from a2a.utils import errors as a2a_errors
from cpa_scheduler import a2a_tasks, errors, store
from google.protobuf import json_format

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def message(*parts: pb.Part, **fields: Any) -> pb.Message:
    return pb.Message(message_id=fields.pop("message_id", "m1"), role=pb.ROLE_USER,
                      parts=list(parts), **fields)  # fmt: skip


def data(value: Any) -> pb.Part:
    part = pb.Part()
    json_format.ParseDict(value, part.data)
    return part


BASE = store.JobRow(
    id=uuid.uuid4(), tenant_id=uuid.uuid4(), created_by=None, request=None, intent="x",
    status="pending", priority=0, idempotency_key=None, todo_count=1, todos_done=0,
    created_at=NOW, started_at=None, completed_at=None, error=None, retry_count=0,
    max_retries=0, run_at=None, time_zone="UTC", schedule_id=None, scheduled_for=None,
    traceparent=None,
)  # fmt: skip


def job(**fields: Any) -> store.JobRow:
    return dataclasses.replace(BASE, id=uuid.uuid4(), **fields)


def test_a_text_or_a_graph_is_a_request() -> None:
    ask = a2a_tasks.ask_of(message(pb.Part(text=" timer 5 s "), context_id="c/1"))
    assert (ask.text, ask.graph, ask.key) == ("timer 5 s", None, "a2a:c%2F1:m1")
    graph = {"graph": {"todos": [{"key": "a", "action": "noop"}]}}
    ask = a2a_tasks.ask_of(message(data(graph), metadata={"timeZone": "Europe/Berlin"}))
    assert ask.graph is not None and ask.graph.todos[0].action == "noop"
    assert ask.time_zone == "Europe/Berlin" and ask.key == "a2a::m1"


@pytest.mark.parametrize(
    ("parts", "fields", "says"),
    [
        ([pb.Part(text="a"), pb.Part(text="b")], {}, "one text part"),
        ([], {}, "one text part"),
        ([data({"graph": {"todos": []}})], {}, "graph.todos"),
        ([pb.Part(text="x" * 4001)], {}, "text"),
        ([pb.Part(text="a")], {"message_id": "ü" * 90}, "too long"),
        ([pb.Part(text="a")], {"message_id": "m" * 97}, "1 to 96"),
        ([pb.Part(text="a\u0000")], {}, "cannot be accepted"),
    ],
)
def test_bad_messages_say_what_is_wrong(parts: list[pb.Part], fields: Any, says: str) -> None:
    with pytest.raises(a2a_errors.InvalidParamsError, match=says):
        a2a_tasks.ask_of(message(*parts, **fields))


def test_the_context_comes_back_from_the_key() -> None:
    assert a2a_tasks.context_of(job(idempotency_key="a2a:chat%3A7:m1")) == "chat:7"
    plain = job(idempotency_key="a2a::m1")
    assert a2a_tasks.context_of(plain) == str(plain.id)
    rest = job(idempotency_key="my-key")  # a REST job: its own id
    assert a2a_tasks.context_of(rest) == str(rest.id)


@pytest.mark.parametrize(
    ("part", "approved"),
    [(pb.Part(text="Ja!"), True), (pb.Part(text="yes"), True), (pb.Part(text=" nein "), False),
     (data({"approved": False}), False), (data({"approved": True}), True)],
)  # fmt: skip
def test_approvals(part: pb.Part, approved: bool) -> None:
    assert a2a_tasks.approval_of(message(part)) is approved


def test_an_unclear_answer_asks_again() -> None:
    with pytest.raises(a2a_errors.InvalidParamsError, match="yes'/'ja"):
        a2a_tasks.approval_of(message(pb.Part(text="vielleicht")))


def todo(status: str, **fields: Any) -> dict[str, Any]:
    return {"id": uuid.uuid4(), "key": "send", "action": "email.send", "status": status,
            "params": {"to": "a@example.com"}, "result": None} | fields  # fmt: skip


def test_a_job_as_a_task() -> None:
    waiting = a2a_tasks.task(job(status="running"), [todo("confirming")])
    assert waiting.status.state == pb.TASK_STATE_INPUT_REQUIRED
    assert "send (email.send)" in waiting.status.message.parts[0].text
    done = a2a_tasks.task(job(status="done"), [todo("done", result={"text": "sent"})])
    assert done.status.state == pb.TASK_STATE_COMPLETED
    [artifact] = done.artifacts
    assert artifact.parts[0].text == "sent" and artifact.name == "send"
    failed = a2a_tasks.task(job(status="failed", error="declined"), [todo("failed")])
    assert failed.status.message.parts[0].text == "declined"


def event(i: int, kind: str, status: str | None, todo_id: str | None = None, **data: Any) -> dict[str, Any]:  # fmt: skip
    return {"id": i, "job_id": uuid.uuid4(), "todo_id": todo_id, "kind": kind, "status": status,
            "data": data, "created_at": NOW}  # fmt: skip


def test_events_become_status_updates_and_artifacts() -> None:
    j = job()
    snapshot = a2a_tasks.task(j, [])
    follower = a2a_tasks.Follower.of(snapshot, [])
    t = str(uuid.uuid4())
    out = follower.events([
        event(1, "todo.status", "confirming", t, key="send", action="email.send", target="desktop"),
        event(2, "todo.status", "running", t, key="send", action="email.send", target="desktop"),
        event(3, "notification", "running", t, title="Erinnerung", message="den Tee"),
        event(4, "todo.status", "done", t, key="send", action="email.send", target="desktop",
              result={"ok": 1}),
        event(5, "job.status", "done"),
    ])  # fmt: skip
    kinds = [type(e).__name__ for e in out]
    assert kinds == ["TaskStatusUpdateEvent"] * 3 + ["TaskArtifactUpdateEvent", "TaskStatusUpdateEvent"]  # fmt: skip
    states = [pb.TaskState.Name(e.status.state) for e in out if isinstance(e, pb.TaskStatusUpdateEvent)]  # fmt: skip
    assert states == ["TASK_STATE_INPUT_REQUIRED", "TASK_STATE_WORKING", "TASK_STATE_WORKING",
                      "TASK_STATE_COMPLETED"]  # fmt: skip
    assert out[2].status.message.parts[0].text == "Erinnerung: den Tee"
    assert [json_format.MessageToDict(e.metadata)["cpa.event_id"] for e in out] == [1, 2, 3, 4, 5]
    assert follower.ended


def test_domain_errors_become_the_specs() -> None:
    assert isinstance(a2a_tasks.error_of(errors.NotFoundError("x")), a2a_errors.TaskNotFoundError)
    bad = a2a_tasks.error_of(errors.ActionError("no such action"))
    assert isinstance(bad, a2a_errors.InvalidParamsError) and bad.data == {"code": "action_invalid"}


def test_a_listing_request_as_filters() -> None:
    request = pb.ListTasksRequest(context_id="chat/1", status=pb.TASK_STATE_WORKING, page_size=7)
    request.status_timestamp_after.FromDatetime(NOW)
    token = a2a_tasks.page_token(NOW, BASE.id)
    request.page_token = token
    assert a2a_tasks.listing(request) == {
        "status": "running", "key_prefix": "a2a:chat%2F1:", "changed_after": NOW,
        "before": (NOW, BASE.id), "limit": 7,
    }  # fmt: skip
    assert a2a_tasks.listing(pb.ListTasksRequest())["limit"] == 50
    with pytest.raises(a2a_errors.InvalidParamsError, match="INPUT_REQUIRED"):
        a2a_tasks.listing(pb.ListTasksRequest(status=pb.TASK_STATE_INPUT_REQUIRED))
