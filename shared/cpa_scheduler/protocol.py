"""The Agent Communication Protocol (ACP) spoken between CPA Desktop AI, its agents and the scheduler.

Every message shares the envelope fields ``id, type, sender, receiver, conversation_id,
in_reply_to, created_at, reply_by, protocol, trace_id`` and carries one typed ``payload``.
``type`` is the discriminator; on the wire it is the lower-case name.

Meaning of each type, and its nearest FIPA ACL act and A2A v1.0 counterpart:

=========  ===================================================  ====================  ==========================
type       meaning                                              FIPA ACL              A2A v1.0
=========  ===================================================  ====================  ==========================
request    ask the scheduler to do something (text or graph)    request               SendMessage (ROLE_USER)
inform     progress or a fact about a job or ToDo               inform                TaskStatusUpdateEvent
propose    a plan offered for approval before it runs           propose               INPUT_REQUIRED + artifact
agree      the receiver will perform the request / assignment   agree                 Task SUBMITTED/WORKING
refuse     the receiver will not perform it; carries a reason   refuse                TASK_STATE_REJECTED
confirm    the user approves a proposed plan or a gated action  accept-proposal (*)   INPUT_REQUIRED follow-up
failure    the action was attempted and failed                  failure               TASK_STATE_FAILED
done       the action finished; carries the result              inform-done/-result   TASK_STATE_COMPLETED
route      forward a request to another agent's queue           proxy (Brokering IP)  client-side agent choice
discover   ask which capabilities (actions, intents) exist      DF search / query-ref Agent Card fetch
offer      advertise capabilities (answer to discover)          DF register           Agent Card skills[]
assign     the scheduler gives a ToDo to a desktop agent        accept-proposal/award SendMessage to the agent
=========  ===================================================  ====================  ==========================

(*) FIPA ``confirm`` is epistemic ("this proposition is true"). Ours means *approval*; it
corresponds to FIPA ``accept-proposal``. ``confirm`` with ``approved = false`` is the rejection.

Flows (each is exercised by the tests):

- Request → Agree | Refuse → Inform* (progress) → Done | Failure   (FIPA Request IP)
- Assign → Agree | Refuse → Done | Failure                         (Contract Net, award step)
- Discover → Offer                                                  (directory search)
- Propose → Confirm                                                 (plan or action approval)
- Route → the routed agent receives the embedded request            (Brokering IP, ``proxy``)

Replies keep ``conversation_id`` (the job) and set ``in_reply_to``; use :func:`reply` (typed)
or :func:`reply_to` (by type name).
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar

import pydantic
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from cpa_scheduler import bounds, errors

PROTOCOL_VERSION = "cpa-acp/1"

MessageType = Literal[
    "request",
    "inform",
    "propose",
    "agree",
    "refuse",
    "confirm",
    "failure",
    "done",
    "route",
    "discover",
    "offer",
    "assign",
]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --- payloads -------------------------------------------------------------------------------


class TodoSpec(_Frozen):
    """One ToDo of a submitted graph, in the shape of ``POST /v1/jobs``."""

    key: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    action: str = Field(min_length=1, max_length=64)
    params: dict[str, Any] = Field(default_factory=dict)
    depends_on: list[str] = Field(default_factory=list)
    target: Literal["cloud", "desktop"] | None = None
    max_attempts: int | None = Field(default=None, ge=1, le=25)
    requires_confirmation: bool | None = None
    run_at: AwareDatetime | None = Field(
        default=None, description="Earliest start, RFC 3339 with offset; null: immediate."
    )
    agent_timeout: int | None = Field(
        default=None,
        ge=1,
        le=2592000,
        description="Desktop ToDos: fail when no agent has taken it this many seconds.",
    )

    @pydantic.field_validator("params")
    @classmethod
    def _storable(cls, value: dict[str, Any]) -> dict[str, Any]:
        bad = bounds.problem(value, max_bytes=bounds.MAX_PARAMS_BYTES)
        if bad is not None:
            raise ValueError(f"params cannot be stored: {bad}")
        return value


class GraphSpec(_Frozen):
    """A graph of ToDos as a client or the planner submits it."""

    todos: list[TodoSpec] = Field(min_length=1)


class UserContext(_Frozen):
    """What the planner needs to know about the user."""

    locale: str = "de-DE"
    timezone: str = "Europe/Berlin"


class RequestPayload(_Frozen):
    text: str | None = Field(default=None, min_length=1, max_length=4000)
    graph: GraphSpec | None = None
    context: UserContext | None = None
    idempotency_key: str | None = Field(default=None, max_length=200)

    @pydantic.model_validator(mode="after")
    def _text_or_graph(self) -> RequestPayload:
        if (self.text is None) == (self.graph is None):
            raise ValueError("give exactly one of 'text' or 'graph'")
        return self


class InformPayload(_Frozen):
    text: str = ""
    job_id: str | None = None
    todo_id: str | None = None
    status: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)


class ProposePayload(_Frozen):
    plan: GraphSpec
    text: str | None = None
    request: str | None = None


class AgreePayload(_Frozen):
    job_id: str | None = None
    todo_id: str | None = None
    text: str | None = None


class RefusePayload(_Frozen):
    reason: str = Field(min_length=1)
    code: str = "refused"
    job_id: str | None = None
    todo_id: str | None = None


class ConfirmPayload(_Frozen):
    todo_id: str | None = None
    job_id: str | None = None
    approved: bool = True

    @pydantic.model_validator(mode="after")
    def _something(self) -> ConfirmPayload:
        if self.todo_id is None and self.job_id is None:
            raise ValueError("name the 'todo_id' or the 'job_id' being confirmed")
        return self


class FailurePayload(_Frozen):
    todo_id: str
    error: str = Field(min_length=1)
    retryable: bool = False


class DonePayload(_Frozen):
    todo_id: str
    result: Any = None


class RoutePayload(_Frozen):
    to_agent: str = Field(min_length=1)
    request: RequestPayload | None = None
    action: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)


class DiscoverPayload(_Frozen):
    target: Literal["cloud", "desktop"] | None = None


class OfferPayload(_Frozen):
    agent_id: str | None = None
    name: str | None = None
    actions: list[str] = Field(default_factory=list)
    intents: list[str] = Field(default_factory=list)


class AssignPayload(_Frozen):
    todo_id: str
    job_id: str
    key: str
    action: str
    params: dict[str, Any] = Field(default_factory=dict)
    attempt: int = 1
    lease_expires_at: AwareDatetime | None = None
    traceparent: str | None = Field(
        default=None,
        max_length=55,
        description="W3C trace context of the job; send it as the traceparent header of the answer.",
    )


# --- messages -------------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


def _new_id() -> str:
    return str(uuid.uuid4())


class _Envelope(_Frozen):
    id: str = Field(default_factory=_new_id, min_length=1)
    sender: str = Field(min_length=1)
    receiver: str = Field(min_length=1)
    conversation_id: str | None = None
    in_reply_to: str | None = None
    created_at: AwareDatetime = Field(default_factory=_now)
    reply_by: AwareDatetime | None = None
    protocol: str = PROTOCOL_VERSION
    trace_id: str = Field(default_factory=lambda: uuid.uuid4().hex)


class Request(_Envelope):
    type: Literal["request"] = "request"
    payload: RequestPayload


class Inform(_Envelope):
    type: Literal["inform"] = "inform"
    payload: InformPayload


class Propose(_Envelope):
    type: Literal["propose"] = "propose"
    payload: ProposePayload


class Agree(_Envelope):
    type: Literal["agree"] = "agree"
    payload: AgreePayload


class Refuse(_Envelope):
    type: Literal["refuse"] = "refuse"
    payload: RefusePayload


class Confirm(_Envelope):
    type: Literal["confirm"] = "confirm"
    payload: ConfirmPayload


class Failure(_Envelope):
    type: Literal["failure"] = "failure"
    payload: FailurePayload


class Done(_Envelope):
    type: Literal["done"] = "done"
    payload: DonePayload


class Route(_Envelope):
    type: Literal["route"] = "route"
    payload: RoutePayload


class Discover(_Envelope):
    type: Literal["discover"] = "discover"
    payload: DiscoverPayload = Field(default_factory=DiscoverPayload)


class Offer(_Envelope):
    type: Literal["offer"] = "offer"
    payload: OfferPayload


class Assign(_Envelope):
    type: Literal["assign"] = "assign"
    payload: AssignPayload


Message = Annotated[
    Request
    | Inform
    | Propose
    | Agree
    | Refuse
    | Confirm
    | Failure
    | Done
    | Route
    | Discover
    | Offer
    | Assign,
    Field(discriminator="type"),
]

MESSAGE_CLASSES: dict[str, type[_Envelope]] = {
    cls.model_fields["type"].default: cls
    for cls in (
        Request, Inform, Propose, Agree, Refuse, Confirm,
        Failure, Done, Route, Discover, Offer, Assign,
    )
}  # fmt: skip

_adapter: pydantic.TypeAdapter[Message] = pydantic.TypeAdapter(Message)


def _field_errors(exc: pydantic.ValidationError) -> list[dict[str, Any]]:
    return [
        {"loc": [str(part) for part in err["loc"]], "msg": err["msg"], "type": err["type"]}
        for err in exc.errors(include_url=False)
    ]


def _describe(errs: list[dict[str, Any]]) -> str:
    parts = [f"{'.'.join(e['loc']) or 'message'}: {e['msg']}" for e in errs[:5]]
    more = f" (and {len(errs) - 5} more)" if len(errs) > 5 else ""
    return "; ".join(parts) + more


def parse(data: str | bytes | dict[str, Any]) -> Message:
    """Validate a message from JSON text or a decoded dict.

    Raises :class:`cpa_scheduler.errors.ProtocolError` whose message names each bad field.
    """
    try:
        if isinstance(data, str | bytes):
            data = json.loads(data)
        bad = bounds.problem(data, max_bytes=bounds.MAX_MESSAGE_BYTES)
        if bad is not None:
            raise errors.ProtocolError(f"The message cannot be accepted: {bad}.")
        return _adapter.validate_python(data)
    except RecursionError:
        raise errors.ProtocolError(
            f"The message is nested deeper than {bounds.MAX_DEPTH} levels."
        ) from None
    except pydantic.ValidationError as exc:
        errs = _field_errors(exc)
        raise errors.ProtocolError(
            f"The message is not a valid protocol message: {_describe(errs)}.", errors=errs
        ) from None
    except json.JSONDecodeError as exc:
        raise errors.ProtocolError(f"The message is not valid JSON: {exc}.") from None


def dump(message: _Envelope) -> dict[str, Any]:
    """The JSON-ready dict of a message."""
    return message.model_dump(mode="json")


def to_json(message: _Envelope) -> str:
    """The wire text of a message."""
    return message.model_dump_json()


def make(
    type_: MessageType,
    payload: BaseModel | dict[str, Any],
    *,
    sender: str,
    receiver: str,
    **envelope: Any,
) -> Message:
    """Build a message of the given type, validating the payload."""
    body = payload.model_dump() if isinstance(payload, BaseModel) else payload
    return parse(
        {"type": type_, "payload": body, "sender": sender, "receiver": receiver, **envelope}
    )


def _answering(message: _Envelope) -> dict[str, Any]:
    """The envelope of a reply: same conversation and trace, ``in_reply_to`` set, roles swapped."""
    return {
        "sender": message.receiver,
        "receiver": message.sender,
        "conversation_id": message.conversation_id,
        "in_reply_to": message.id,
        "trace_id": message.trace_id,
    }


M = TypeVar("M", bound=_Envelope)


def reply(
    message: _Envelope, kind: type[M], payload: BaseModel, *, conversation_id: str | None = None
) -> M:
    """A reply of message class ``kind`` to ``message``; ``conversation_id`` names a new
    conversation (the job a request created) instead of the message's."""
    fields = _answering(message) | {"payload": payload}
    if conversation_id is not None:
        fields["conversation_id"] = conversation_id
    return kind.model_validate(fields)


def reply_to(
    message: _Envelope,
    type_: MessageType,
    payload: BaseModel | dict[str, Any],
    *,
    sender: str | None = None,
    **envelope: Any,
) -> Message:
    """A reply to ``message`` by type name, validated like a received message."""
    fields = _answering(message)
    fields.update(envelope)
    if sender:
        fields["sender"] = sender
    return make(type_, payload, **fields)
