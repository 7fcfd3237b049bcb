"""The A2A edge's model: jobs as A2A tasks and messages as job requests (the Agent Card is
:mod:`cpa_scheduler.card`'s).

An A2A task *is* a job: the task id is the job id and its ``contextId`` the conversation the
caller named (kept in the job's idempotency key, see :func:`idempotency_key`). The states map
one to one (pending → submitted, running → working, done → completed, failed → failed,
cancelled → canceled); a job with a ToDo waiting for approval is input-required, and the
caller's next message approves or declines it (our ``confirm``). A ToDo's result is an
artifact whose id is the ToDo's id. Stream events come from the job's progress events, and
each carries the event's id (``metadata["cpa.event_id"]``), the cursor a resubscription may
resume after.

The types are the ``a2a-sdk``'s (protocol buffers of the A2A 1.0 specification); this module
imports no web framework.
"""

from __future__ import annotations

import base64
import urllib.parse
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pydantic
from a2a.types import a2a_pb2 as pb
from a2a.utils import errors as a2a_errors
from google.protobuf import json_format, struct_pb2, timestamp_pb2

from cpa_scheduler import (
    bounds,
    errors,
    events,
    graph,
    protocol,
    store,
)

KEY_PREFIX = "a2a:"
MAX_ID = 96  # characters of a contextId or messageId
MAX_KEY = 200  # the idempotency key (KEY_PREFIX, the quoted contextId and messageId)

STATES: dict[graph.JobStatus, pb.TaskState] = {
    "pending": pb.TASK_STATE_SUBMITTED,
    "running": pb.TASK_STATE_WORKING,
    "done": pb.TASK_STATE_COMPLETED,
    "failed": pb.TASK_STATE_FAILED,
    "cancelled": pb.TASK_STATE_CANCELED,
}
TERMINAL = frozenset({pb.TASK_STATE_COMPLETED, pb.TASK_STATE_FAILED, pb.TASK_STATE_CANCELED})
YES = frozenset({"yes", "y", "ja", "j", "ok", "okay", "approve", "approved", "confirm", "genehmigt",
                 "bestätigt", "bestätigen", "einverstanden", "go", "los"})  # fmt: skip
NO = frozenset({"no", "n", "nein", "decline", "declined", "reject", "ablehnen", "abgelehnt",
                "stop", "abbrechen", "cancel"})  # fmt: skip

# --- incoming messages ----------------------------------------------------------------------


@dataclass(frozen=True)
class Ask:
    """What a message asks for: a text or a graph; ``key`` holds its conversation."""

    key: str
    text: str | None = None
    graph: protocol.GraphSpec | None = None
    time_zone: str = "UTC"


def _value(data: Any) -> struct_pb2.Value:
    value = struct_pb2.Value()
    json_format.ParseDict(data, value)
    return value


def _plain(value: struct_pb2.Value | struct_pb2.Struct) -> Any:
    return json_format.MessageToDict(value)


def _invalid(message: str, **data: Any) -> a2a_errors.InvalidParamsError:
    return a2a_errors.InvalidParamsError(message=message, data=data or None)


def idempotency_key(context_id: str, message_id: str) -> str:
    """The job's idempotency key for a message: a repeated message id (in its context) is the
    same job. It also keeps the context id, which :func:`context_of` reads back."""
    quoted = [urllib.parse.quote(part, safe="") for part in (context_id, message_id)]
    return KEY_PREFIX + ":".join(quoted)


def context_of(job: store.JobRow) -> str:
    """The conversation of a job: the A2A caller's contextId, else the job id."""
    key = job.idempotency_key or ""
    if key.startswith(KEY_PREFIX) and ":" in key[len(KEY_PREFIX) :]:
        context = urllib.parse.unquote(key[len(KEY_PREFIX) :].split(":", 1)[0])
        if context:
            return context
    return str(job.id)


def _checked_id(value: str, what: str) -> str:
    if not value or len(value) > MAX_ID:
        raise _invalid(f"The message's {what} must have 1 to {MAX_ID} characters.")
    return value


def ask_of(message: pb.Message) -> Ask:
    """A new task's message as a request: one text part, or a data part with a ``graph``."""
    problem = bounds.problem(_plain_message(message), max_bytes=bounds.MAX_MESSAGE_BYTES)
    if problem is not None:
        raise _invalid(f"The message cannot be accepted: {problem}.")
    message_id = _checked_id(message.message_id, "messageId")
    context_id = _checked_id(message.context_id, "contextId") if message.context_id else None
    texts = [p.text for p in message.parts if p.WhichOneof("content") == "text" and p.text.strip()]
    graphs = [
        _plain(p.data) for p in message.parts
        if p.WhichOneof("content") == "data" and isinstance(_plain(p.data), dict)
        and "graph" in _plain(p.data)
    ]  # fmt: skip
    if len(graphs) > 1 or (not graphs and len(texts) != 1):
        raise _invalid(
            "Send one text part with the request (e.g. 'Erinnere mich in 10 Minuten an den "
            "Tee'), or one data part {'graph': {'todos': [...]}}."
        )
    zone = _metadata(message).get("timeZone") or _metadata(message).get("time_zone") or "UTC"
    # Without a contextId the job's id names the conversation (see context_of).
    key = idempotency_key(context_id or "", message_id)
    if len(key) > MAX_KEY:
        raise _invalid(f"The contextId and messageId are too long together ({len(key)} of "
                       f"{MAX_KEY} characters once URL-quoted); use shorter ids.")  # fmt: skip
    try:
        if graphs:
            spec = protocol.GraphSpec.model_validate(graphs[0]["graph"])
            return Ask(key=key, graph=spec, time_zone=str(zone))
        payload = protocol.RequestPayload(text=texts[0].strip())
    except pydantic.ValidationError as exc:
        where = "graph" if graphs else "text"
        said = "; ".join(
            f"{'.'.join(str(p) for p in (where, *e['loc']))}: {e['msg']}"
            for e in exc.errors(include_url=False)[:5]
        )
        raise _invalid(f"The message is not a valid request: {said}.") from None
    return Ask(key=key, text=payload.text, time_zone=str(zone))


def _plain_message(message: pb.Message) -> dict[str, Any]:
    return dict(json_format.MessageToDict(message))


def _metadata(message: pb.Message) -> dict[str, Any]:
    return dict(_plain(message.metadata)) if message.HasField("metadata") else {}


def approval_of(message: pb.Message) -> bool:
    """The caller's answer to an input-required task: a data part ``{"approved": bool}`` or a
    text such as yes/ja or no/nein."""
    for part in message.parts:
        if part.WhichOneof("content") == "data":
            data = _plain(part.data)
            if isinstance(data, dict) and isinstance(data.get("approved"), bool):
                return bool(data["approved"])
        if part.WhichOneof("content") == "text":
            word = part.text.strip().strip(".!").casefold()
            if word in YES:
                return True
            if word in NO:
                return False
    raise _invalid(
        "The task waits for your approval: answer 'yes'/'ja' to approve, 'no'/'nein' to "
        "decline, or send a data part {'approved': true|false}."
    )


# --- jobs as tasks --------------------------------------------------------------------------


def _timestamp(when: datetime | None) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(when or datetime.now(UTC))
    return stamp


def _agent_message(task_id: str, context_id: str, text: str, data: Any = None) -> pb.Message:
    parts = [pb.Part(text=text)]
    if data is not None:
        parts.append(pb.Part(data=_value(data), media_type="application/json"))
    return pb.Message(
        message_id=str(uuid.uuid4()), context_id=context_id, task_id=task_id,
        role=pb.ROLE_AGENT, parts=parts,
    )  # fmt: skip


def awaiting(todos: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The ToDos waiting for the caller's approval."""
    return [t for t in todos if t["status"] == "confirming"]


def _question(task_id: str, context_id: str, todos: Sequence[Mapping[str, Any]]) -> pb.Message:
    named = ", ".join(f"{t['key']} ({t['action']})" for t in todos)
    asked = [{"key": t["key"], "action": t["action"], "params": t.get("params") or {}}
             for t in todos]  # fmt: skip
    return _agent_message(
        task_id, context_id,
        f"Approve {named}? Answer yes/ja to approve or no/nein to decline.",
        {"awaiting_approval": asked},
    )  # fmt: skip


def artifact(todo: Mapping[str, Any]) -> pb.Artifact:
    """A done ToDo's result: the artifact whose id is the ToDo's id."""
    result = todo.get("result")
    parts = [pb.Part(data=_value(result), media_type="application/json")]
    text = _text_of(result)
    if text:
        parts.insert(0, pb.Part(text=text))
    return pb.Artifact(
        artifact_id=str(todo["id"]), name=str(todo["key"]), description=str(todo["action"]),
        parts=parts,
    )  # fmt: skip


def _text_of(result: Any) -> str | None:
    if isinstance(result, str):
        return result
    if isinstance(result, dict):
        if isinstance(result.get("message"), str) and result.get("title"):
            return f"{result['title']}: {result['message']}"
        for name in ("text", "message"):
            if isinstance(result.get(name), str):
                return str(result[name])
    return None


def task(job: store.JobRow, todos: Sequence[Mapping[str, Any]]) -> pb.Task:
    """The job as an A2A task, with a done ToDo's result as an artifact."""
    task_id, context_id = str(job.id), context_of(job)
    state = STATES[job.status]
    message = None
    asking = awaiting(todos)
    if asking and state not in TERMINAL:
        state = pb.TASK_STATE_INPUT_REQUIRED
        message = _question(task_id, context_id, asking)
    elif job.error and state == pb.TASK_STATE_FAILED:
        message = _agent_message(task_id, context_id, job.error)
    when = job.completed_at or job.started_at or job.created_at
    status = pb.TaskStatus(state=state, timestamp=_timestamp(when))
    if message is not None:
        status.message.CopyFrom(message)
    return pb.Task(
        id=task_id, context_id=context_id, status=status,
        artifacts=[artifact(t) for t in todos if t["status"] == "done"],
        metadata=_struct({"cpa.intent": job.intent, "cpa.job_status": job.status}),
    )  # fmt: skip


def _struct(data: Mapping[str, Any]) -> struct_pb2.Struct:
    value = struct_pb2.Struct()
    json_format.ParseDict(dict(data), value)
    return value


Event = pb.TaskStatusUpdateEvent | pb.TaskArtifactUpdateEvent


@dataclass
class Follower:
    """Turns a job's progress events into A2A stream events, in order, from a task snapshot."""

    task_id: str
    context_id: str
    job_status: graph.JobStatus
    asking: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    ended: bool = False

    @classmethod
    def of(cls, snapshot: pb.Task, todos: Sequence[Mapping[str, Any]]) -> Follower:
        status = str(_plain(snapshot.metadata).get("cpa.job_status", "pending"))
        asking = {str(t["id"]): t for t in awaiting(todos)}
        ended = snapshot.status.state in TERMINAL
        return cls(snapshot.id, snapshot.context_id, status, asking, ended)  # type: ignore[arg-type]

    def _state(self) -> pb.TaskState:
        state = STATES[self.job_status]
        if self.asking and state not in TERMINAL:
            return pb.TASK_STATE_INPUT_REQUIRED
        return state

    def events(self, rows: Iterable[Mapping[str, Any]]) -> list[Event]:
        """The stream events of these progress event rows (``job_events``, in id order)."""
        out: list[Event] = []
        for row in rows:
            event = events.view(dict(row))
            meta = {"cpa.event_id": event["id"], "cpa.kind": event["kind"]}
            if event["todo_id"]:
                meta["cpa.todo_id"] = event["todo_id"]
            produced = self._one(event, meta)
            if produced is not None:
                out.append(produced)
            if events.is_terminal(event):
                self.ended = True
        return out

    def _one(self, event: dict[str, Any], meta: dict[str, Any]) -> Event | None:
        kind, data, status = event["kind"], event["data"] or {}, event["status"]
        when = datetime.fromisoformat(event["created_at"])
        text: str | None = None
        extra: Any = None
        if kind == "job.status" and status in STATES:
            self.job_status = status
            text = data.get("error") or f"job {status}"
        elif kind == "todo.status":
            todo_id = event["todo_id"]
            row = {"id": todo_id, "key": data.get("key"), "action": data.get("action"),
                   "status": status, "result": data.get("result")}  # fmt: skip
            if status == "done" and "result" in data:
                meta["cpa.todo_key"] = str(data.get("key"))
                return pb.TaskArtifactUpdateEvent(
                    task_id=self.task_id, context_id=self.context_id, artifact=artifact(row),
                    last_chunk=True, metadata=_struct(meta),
                )  # fmt: skip
            if status == "running" and self.job_status == "pending":
                self.job_status = "running"  # its job.status event follows in the same commit
            if status == "confirming":
                self.asking[todo_id] = row
            else:
                self.asking.pop(todo_id, None)
            text = f"{data.get('key')} ({data.get('action')}): {status}"
            if data.get("error"):
                text += f": {data['error']}"
        elif kind == "notification":
            title = data.get("title")
            text = f"{title}: {data.get('message', '')}" if title else str(data.get("message"))
            extra = data
        else:
            text = kind
            extra = data
        state = self._state()
        if state == pb.TASK_STATE_INPUT_REQUIRED and kind == "todo.status":
            message = _question(self.task_id, self.context_id, list(self.asking.values()))
        else:
            message = _agent_message(self.task_id, self.context_id, text, extra)
        return pb.TaskStatusUpdateEvent(
            task_id=self.task_id, context_id=self.context_id,
            status=pb.TaskStatus(state=state, message=message, timestamp=_timestamp(when)),
            metadata=_struct(meta),
        )  # fmt: skip


# --- listing ----------------------------------------------------------------------------------

PAGE_SIZE, MAX_PAGE_SIZE = 50, 100
JOB_STATUS = {state: status for status, state in STATES.items()}


def page_token(created_at: datetime, job_id: uuid.UUID) -> str:
    """The ListTasks cursor after this job (newest first)."""
    raw = f"{created_at.isoformat()}|{job_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _after_token(token: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        created, _, ident = raw.partition("|")
        when = datetime.fromisoformat(created)
        if when.tzinfo is None:
            raise ValueError("naive")
        return when, uuid.UUID(ident)
    except (ValueError, UnicodeDecodeError):
        raise _invalid(f"The pageToken {token!r} is not one this agent issued.") from None


def listing(params: pb.ListTasksRequest) -> dict[str, Any]:
    """The filters and page of a ListTasks request, as :meth:`store.Session.task_list` takes
    them. A state no job has without its ToDos (input-required) cannot be filtered on."""
    size = params.page_size or PAGE_SIZE
    if not 1 <= size <= MAX_PAGE_SIZE:
        raise _invalid(f"pageSize must be 1 to {MAX_PAGE_SIZE}, not {size}.")
    status = None
    if params.status != pb.TASK_STATE_UNSPECIFIED:
        if params.status not in JOB_STATUS:
            name = pb.TaskState.Name(params.status)
            raise _invalid(f"Tasks cannot be listed by the state {name}; leave status out or "
                           f"use one of {', '.join(pb.TaskState.Name(s) for s in JOB_STATUS)}.")  # fmt: skip
        status = JOB_STATUS[params.status]
    prefix = None
    if params.context_id:
        prefix = idempotency_key(_checked_id(params.context_id, "contextId"), "")
    changed = params.status_timestamp_after.ToDatetime(tzinfo=UTC) if params.HasField(
        "status_timestamp_after") else None  # fmt: skip
    before = _after_token(params.page_token) if params.page_token else None
    return {"status": status, "key_prefix": prefix, "changed_after": changed, "before": before,
            "limit": size}  # fmt: skip


# --- errors ---------------------------------------------------------------------------------


def error_of(exc: errors.CpaError) -> a2a_errors.A2AError:
    """The A2A (JSON-RPC) error of a domain error the caller can act on."""
    data = {"code": exc.code}  # google.rpc.ErrorInfo metadata: strings only
    if isinstance(exc, errors.NotFoundError):
        return a2a_errors.TaskNotFoundError(message=exc.message)
    if isinstance(exc, errors.InvalidError | errors.PlannerError | errors.ConflictError):
        return a2a_errors.InvalidParamsError(message=exc.message, data=data)
    return a2a_errors.InternalError(message=exc.message, data=data)
