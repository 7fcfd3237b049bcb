"""The agent protocol: round trips, factories, flows and validation errors."""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cpa_scheduler import errors, protocol

PAYLOADS: dict[str, dict[str, Any]] = {
    "request": {"text": "Erinnere mich morgen um 9 an den Zahnarzt"},
    "inform": {"text": "2 of 5 done", "job_id": "j1", "status": "running"},
    "propose": {"plan": {"todos": [{"key": "a", "action": "noop"}]}, "text": "ok?"},
    "agree": {"job_id": "j1"},
    "refuse": {"reason": "no planner configured", "code": "planner"},
    "confirm": {"todo_id": "t1"},
    "failure": {"todo_id": "t1", "error": "disk full", "retryable": True},
    "done": {"todo_id": "t1", "result": {"path": "/tmp/x"}},
    "route": {"to_agent": "laptop-2", "request": {"text": "open spotify"}},
    "discover": {"target": "desktop"},
    "offer": {"agent_id": "laptop-1", "actions": ["desktop.open_app"]},
    "assign": {
        "todo_id": "t1",
        "job_id": "j1",
        "key": "open",
        "action": "desktop.open_app",
        "params": {"app": "Spotify"},
    },
}


def test_every_type_is_covered() -> None:
    assert set(PAYLOADS) == set(protocol.MESSAGE_CLASSES)
    assert len(PAYLOADS) == 12


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_json_round_trip(kind: str) -> None:
    reply_by = datetime.now(UTC) + timedelta(minutes=5)
    msg = protocol.make(
        kind,
        PAYLOADS[kind],
        sender="desktop",
        receiver="scheduler",  # type: ignore[arg-type]
        conversation_id="job-1",
        reply_by=reply_by,
    )
    assert isinstance(msg, protocol.MESSAGE_CLASSES[kind])
    wire = protocol.to_json(msg)
    assert json.loads(wire)["type"] == kind
    back = protocol.parse(wire)
    assert back == msg
    assert back.created_at.tzinfo is not None
    assert back.protocol == protocol.PROTOCOL_VERSION
    assert protocol.parse(protocol.dump(msg)) == msg


def test_payload_is_typed_not_a_free_dict() -> None:
    with pytest.raises(errors.ProtocolError) as info:
        protocol.parse({"type": "done", "sender": "a", "receiver": "b", "payload": {"result": 1}})
    assert "payload.todo_id" in info.value.message
    assert info.value.errors[0]["loc"][-1] == "todo_id"


def test_unknown_type_names_the_field() -> None:
    with pytest.raises(errors.ProtocolError) as info:
        protocol.parse({"type": "shout", "sender": "a", "receiver": "b", "payload": {}})
    assert "type" in info.value.message


def test_naive_datetime_is_rejected() -> None:
    with pytest.raises(errors.ProtocolError) as info:
        protocol.parse(
            {
                "type": "agree",
                "sender": "a",
                "receiver": "b",
                "payload": {},
                "created_at": "2026-01-01T10:00:00",
            }
        )
    assert "created_at" in info.value.message


def test_invalid_json_is_a_protocol_error() -> None:
    with pytest.raises(errors.ProtocolError):
        protocol.parse("{not json")


def test_extra_fields_are_rejected() -> None:
    with pytest.raises(errors.ProtocolError) as info:
        protocol.parse({"type": "agree", "sender": "a", "receiver": "b", "payload": {}, "x": 1})
    assert "x" in info.value.message


def test_request_needs_text_or_graph_not_both() -> None:
    with pytest.raises(errors.ProtocolError, match="exactly one"):
        protocol.make("request", {}, sender="a", receiver="b")
    with pytest.raises(errors.ProtocolError, match="exactly one"):
        protocol.make(
            "request",
            {"text": "x", "graph": {"todos": [{"key": "a", "action": "noop"}]}},
            sender="a",
            receiver="b",
        )


def test_confirm_names_what_it_confirms() -> None:
    with pytest.raises(errors.ProtocolError, match="todo_id"):
        protocol.make("confirm", {}, sender="a", receiver="b")


def test_messages_are_frozen() -> None:
    msg = protocol.make("agree", {}, sender="a", receiver="b")
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises ValidationError on frozen set
        msg.sender = "c"  # type: ignore[misc]


def test_reply_keeps_conversation_and_sets_in_reply_to() -> None:
    req = protocol.make(
        "request",
        PAYLOADS["request"],
        sender="desktop",
        receiver="scheduler",
        conversation_id="job-7",
    )
    agree = protocol.reply_to(req, "agree", {"job_id": "job-7"})
    assert agree.type == "agree"
    assert agree.in_reply_to == req.id
    assert agree.conversation_id == "job-7"
    assert agree.trace_id == req.trace_id
    assert (agree.sender, agree.receiver) == ("scheduler", "desktop")
    assert agree.id != req.id


def _flow(*steps: tuple[str, dict[str, Any]]) -> list[protocol.Message]:
    first_kind, first_payload = steps[0]
    msgs: list[protocol.Message] = [
        protocol.make(
            first_kind,
            first_payload,
            sender="desktop",  # type: ignore[arg-type]
            receiver="scheduler",
            conversation_id="job-1",
        )
    ]
    for kind, payload in steps[1:]:
        msgs.append(protocol.reply_to(msgs[-1], kind, payload))  # type: ignore[arg-type]
    return msgs


@pytest.mark.parametrize(
    "steps",
    [
        # Request -> Agree -> Inform -> Done (FIPA Request IP)
        [
            ("request", PAYLOADS["request"]),
            ("agree", {"job_id": "job-1"}),
            ("inform", {"text": "running"}),
            ("done", {"todo_id": "t1", "result": 1}),
        ],
        # Request -> Refuse
        [("request", PAYLOADS["request"]), ("refuse", {"reason": "rate limited"})],
        # Assign -> Agree -> Failure
        [
            ("assign", PAYLOADS["assign"]),
            ("agree", {"todo_id": "t1"}),
            ("failure", {"todo_id": "t1", "error": "app missing"}),
        ],
        # Discover -> Offer
        [("discover", {}), ("offer", {"actions": ["noop"], "intents": ["timer"]})],
        # Propose -> Confirm
        [("propose", PAYLOADS["propose"]), ("confirm", {"job_id": "job-1", "approved": True})],
    ],
    ids=["request-done", "request-refuse", "assign-failure", "discover-offer", "propose-confirm"],
)
def test_flows_thread_one_conversation(steps: list[tuple[str, dict[str, Any]]]) -> None:
    msgs = _flow(*steps)
    assert [m.type for m in msgs] == [s[0] for s in steps]
    assert {m.conversation_id for m in msgs} == {"job-1"}
    for earlier, later in itertools.pairwise(msgs):
        assert later.in_reply_to == earlier.id
        assert later.receiver == earlier.sender


def test_route_embeds_a_request_for_another_agent() -> None:
    msg = protocol.make("route", PAYLOADS["route"], sender="desktop", receiver="scheduler")
    assert isinstance(msg, protocol.Route)
    assert msg.payload.request is not None
    assert msg.payload.request.text == "open spotify"
