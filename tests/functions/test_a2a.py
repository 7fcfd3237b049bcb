"""The A2A edge: a2a-sdk's client against the app on a real socket, with the dispatcher running.

Every answer the server sends on these tests' connections (the card, each JSON-RPC response,
each SSE event) is recorded and checked against the A2A 1.0 protocol buffers the SDK ships:
parsed strictly (an unknown field fails) and with every REQUIRED field present.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from a2a.client import ClientCallContext, ClientConfig, create_client
from a2a.client.client import Client
from a2a.types import a2a_pb2 as pb
from a2a.utils import errors as a2a_errors
from a2a.utils.proto_utils import validate_proto_required_fields
from cpa_scheduler import a2a_tasks, catalogue, dispatch, intents, protocol, store
from google.protobuf import json_format
from google.protobuf.message import Message as ProtoMessage

from tests.conftest import Member, MemberFactory
from tests.functions.conftest import bearer, token_for

ROOT = Path(__file__).resolve().parents[2]
RESULT_TYPES: dict[str, type[ProtoMessage]] = {
    "SendMessage": pb.SendMessageResponse,
    "ListTasks": pb.ListTasksResponse,
    "GetTask": pb.Task,
    "CancelTask": pb.Task,
    "SendStreamingMessage": pb.StreamResponse,
    "SubscribeToTask": pb.StreamResponse,
}
SPEC_CODES = {-32700, -32600, -32601, -32602, -32603, *range(-32009, -32000)}


def strict(data: Any, cls: type[ProtoMessage]) -> ProtoMessage:
    """``data`` parsed as ``cls`` by the SDK's protocol buffers: no unknown field, none of the
    REQUIRED ones missing."""
    message = json_format.ParseDict(data, cls())
    try:
        validate_proto_required_fields(message)
    except a2a_errors.InvalidParamsError as exc:
        assert exc.data is not None
        # A REQUIRED field sent with its zero value ("", 0, []) is present on the wire (the
        # spec's last ListTasks page: nextPageToken "", an empty page: tasks [], totalSize 0);
        # the check on the parsed message cannot tell it from a missing one.
        camel = {e["field"]: re.sub(r"_(\w)", lambda m: m.group(1).upper(), e["field"])
                 for e in exc.data["errors"]}  # fmt: skip
        left = [e for e in exc.data["errors"] if camel[e["field"]] not in data]
        assert not left, left
    return message


class Recorder(httpx.AsyncBaseTransport):
    """A real HTTP transport that keeps every A2A answer body (streams too, also when the
    client drops them) for validation."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.answers: list[tuple[str, bytes]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        method = "card"
        if request.method == "POST":
            try:
                method = str(json.loads(request.content).get("method", "?"))
            except ValueError:
                method = "?"  # not JSON: the answer is an error
        inner, seen, answers = response.stream, bytearray(), self.answers

        class Tee(httpx.AsyncByteStream):
            async def __aiter__(self) -> AsyncIterator[bytes]:
                async for chunk in inner:  # type: ignore[attr-defined]
                    seen.extend(chunk)
                    yield chunk

            async def aclose(self) -> None:
                answers.append((method, bytes(seen)))
                await inner.aclose()  # type: ignore[attr-defined]

        return httpx.Response(
            response.status_code, headers=response.headers, stream=Tee(),
            extensions=response.extensions,
        )  # fmt: skip

    async def aclose(self) -> None:
        """The clients sharing this transport close it; the fixture closes the pool."""

    def validate(self) -> int:
        """Check every recorded answer; the number checked."""
        checked = 0
        for method, body in self.answers:
            if method == "card":
                strict(json.loads(body), pb.AgentCard)
                checked += 1
                continue
            text = body.decode()
            if text.startswith("{"):
                documents = [json.loads(text)]
            else:  # SSE: each complete event's data is one JSON-RPC response
                events = [e for e in text.replace("\r\n", "\n").split("\n\n") if e.strip()]
                if not text.endswith("\n\n") and events:
                    events.pop()  # a dropped stream's last, partial event
                documents = [
                    json.loads("".join(line[5:].strip() for line in event.splitlines()
                                       if line.startswith("data:")))
                    for event in events if "data:" in event
                ]  # fmt: skip
            for doc in documents:
                assert doc["jsonrpc"] == "2.0" and "id" in doc, doc
                if "error" in doc:
                    assert doc["error"]["code"] in SPEC_CODES, doc
                    assert isinstance(doc["error"]["message"], str) and doc["error"]["message"]
                else:
                    strict(doc["result"], RESULT_TYPES[method])
                checked += 1
        return checked


@pytest.fixture
async def dispatcher(db: store.Store, db_url: str) -> AsyncIterator[None]:
    """The long-running dispatcher (LISTEN/NOTIFY) over the test database."""
    stop = asyncio.Event()
    runner = asyncio.create_task(dispatch.Dispatcher(db).run_forever(db_url, stop=stop))
    yield
    stop.set()
    await asyncio.wait_for(runner, 10)


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    recording = Recorder()
    yield recording
    await recording.inner.aclose()


ClientFactory = Callable[..., Awaitable[Client]]


@pytest.fixture
async def a2a(live_api: str, recorder: Recorder) -> AsyncIterator[ClientFactory]:
    """Clients of the SDK for a member (streaming or not), over the recording transport."""
    https: list[httpx.AsyncClient] = []

    async def make(member: Member, *, streaming: bool = True) -> Client:
        http = httpx.AsyncClient(headers=bearer(member), transport=recorder, timeout=30)
        https.append(http)
        return await create_client(live_api, ClientConfig(httpx_client=http, streaming=streaming))

    yield make
    for http in https:
        await http.aclose()
    assert recorder.validate() > 0


def text_message(text: str, **fields: Any) -> pb.SendMessageRequest:
    message = pb.Message(message_id=str(uuid.uuid4()), role=pb.ROLE_USER, parts=[pb.Part(text=text)],
                         **fields)  # fmt: skip
    return pb.SendMessageRequest(message=message)


def graph_message(todos: list[dict[str, Any]], *, now: bool = False) -> pb.SendMessageRequest:
    data = json_format.ParseDict({"graph": {"todos": todos}}, pb.Part().data)
    message = pb.Message(message_id=str(uuid.uuid4()), role=pb.ROLE_USER,
                         parts=[pb.Part(data=data, media_type="application/json")])  # fmt: skip
    config = pb.SendMessageConfiguration(return_immediately=now)
    return pb.SendMessageRequest(message=message, configuration=config)


async def only_task(client: Client, request: pb.SendMessageRequest) -> pb.Task:
    [answer] = [event async for event in client.send_message(request)]
    assert answer.HasField("task")
    return answer.task


def state(task: pb.Task) -> str:
    return pb.TaskState.Name(task.status.state)


async def test_the_card_validates_and_names_the_endpoint(live_api: str, recorder: Recorder) -> None:
    async with httpx.AsyncClient(transport=recorder) as http:
        r = await http.get(f"{live_api}/.well-known/agent-card.json")
    assert r.status_code == 200 and "max-age" in r.headers["cache-control"]
    card = strict(r.json(), pb.AgentCard)
    assert isinstance(card, pb.AgentCard) and recorder.validate() == 1
    [interface] = card.supported_interfaces
    assert (interface.url, interface.protocol_binding, interface.protocol_version) == (
        f"{live_api}/a2a", "JSONRPC", "1.0",
    )  # fmt: skip
    assert card.capabilities.streaming and card.version
    scheme = card.security_schemes["supabase"].http_auth_security_scheme
    assert scheme.scheme.lower() == "bearer"
    assert "supabase" in card.security_requirements[0].schemes
    tags = {tag for skill in card.skills for tag in skill.tags}
    assert set(intents.default().names()) - {"unknown"} <= tags  # every intent has a skill
    assert {a for a in catalogue.default().names() if a not in ("noop", "plan")} <= tags
    reminders = next(s for s in card.skills if s.id == "reminders")
    assert any(e.startswith("Erinnere") for e in reminders.examples)
    assert any(e.startswith("Remind") for e in reminders.examples)
    for skill in card.skills:
        if skill.id.startswith("actions."):  # its example graph is one the API accepts
            example = json.loads(skill.examples[-1])
            catalogue.default().build(protocol.GraphSpec.model_validate(example["graph"]))


async def test_send_and_get(
    a2a: ClientFactory, dispatcher: None, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    client = await a2a(m, streaming=False)
    task = await only_task(client, text_message("Stell einen Timer auf 1 Sekunde"))
    assert state(task) == "TASK_STATE_COMPLETED"  # SendMessage waits for the end
    ring = next(a for a in task.artifacts if a.name == "ring")
    assert ring.parts[0].text == "Timer: 1 Sekunde sind um."
    got = await client.get_task(pb.GetTaskRequest(id=task.id))
    assert got.id == task.id and state(got) == "TASK_STATE_COMPLETED"
    assert {a.artifact_id for a in got.artifacts} == {a.artifact_id for a in task.artifacts}

    request = graph_message([{"key": "a", "action": "noop", "params": {"x": 1}}], now=True)
    submitted = await only_task(client, request)
    assert state(submitted) in ("TASK_STATE_SUBMITTED", "TASK_STATE_WORKING",
                                "TASK_STATE_COMPLETED")  # fmt: skip
    again = await only_task(client, request)  # the same message id: the same job
    assert again.id == submitted.id and again.context_id == submitted.context_id
    for _ in range(100):
        got = await client.get_task(pb.GetTaskRequest(id=submitted.id))
        if state(got) == "TASK_STATE_COMPLETED":
            break
        await asyncio.sleep(0.05)
    [result] = got.artifacts
    assert result.name == "a" and json_format.MessageToDict(result.parts[-1].data) == {"x": 1}


async def test_the_context_is_the_callers_conversation(
    a2a: ClientFactory, member_factory: MemberFactory, live_api: str
) -> None:
    m = await member_factory()
    client = await a2a(m, streaming=False)
    request = graph_message([{"key": "a", "action": "noop"}], now=True)
    request.message.context_id = "chat-42"
    task = await only_task(client, request)
    assert task.context_id == "chat-42"
    async with httpx.AsyncClient(base_url=live_api, headers=bearer(m)) as http:
        job = (await http.get(f"/v1/jobs/{task.id}")).json()  # the task is the job
    assert job["id"] == task.id and job["status"] == "pending"


async def test_stream_to_completion(
    a2a: ClientFactory, dispatcher: None, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    client = await a2a(m)
    todos = [{"key": f"s{i}", "action": "noop", "params": {"i": i},
              "depends_on": [f"s{i - 1}"] if i else []} for i in range(3)]  # fmt: skip
    events = [e async for e in client.send_message(graph_message(todos))]
    assert events[0].HasField("task")
    assert state(events[0].task) == "TASK_STATE_SUBMITTED"
    artifacts = [e.artifact_update.artifact.name for e in events if e.HasField("artifact_update")]
    assert artifacts == ["s0", "s1", "s2"]
    last = events[-1].status_update
    assert pb.TaskState.Name(last.status.state) == "TASK_STATE_COMPLETED"
    assert all(e.status_update.task_id == events[0].task.id for e in events[1:]
               if e.HasField("status_update"))  # fmt: skip


async def test_cancel(a2a: ClientFactory, dispatcher: None, member_factory: MemberFactory) -> None:
    m = await member_factory()
    client = await a2a(m, streaming=False)
    task = await only_task(client, graph_message([{"key": "w", "action": "wait",
                                                   "params": {"seconds": 30}}], now=True))  # fmt: skip
    canceled = await client.cancel_task(pb.CancelTaskRequest(id=task.id))
    assert canceled.id == task.id and state(canceled) == "TASK_STATE_CANCELED"
    with pytest.raises(a2a_errors.TaskNotCancelableError):
        await client.cancel_task(pb.CancelTaskRequest(id=task.id))


async def test_input_required_then_the_next_message_confirms(
    a2a: ClientFactory, dispatcher: None, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    client = await a2a(m, streaming=False)
    gated = [{"key": "go", "action": "noop", "requires_confirmation": True, "params": {"y": 2}}]
    task = await only_task(client, graph_message(gated))  # waits for input: answers at once
    assert state(task) == "TASK_STATE_INPUT_REQUIRED"
    assert "go (noop)" in task.status.message.parts[0].text
    done = await only_task(client, text_message("Ja", task_id=task.id, context_id=task.context_id))
    assert done.id == task.id and state(done) == "TASK_STATE_COMPLETED"

    declined = await only_task(client, graph_message(gated))
    answer = text_message("nein", task_id=declined.id)
    assert state(await only_task(client, answer)) == "TASK_STATE_FAILED"
    with pytest.raises(a2a_errors.UnsupportedOperationError):  # it waits for nothing now
        await only_task(client, text_message("ja", task_id=declined.id))
    third = await only_task(client, graph_message(gated))
    with pytest.raises(a2a_errors.InvalidParamsError, match="approval"):
        await only_task(client, text_message("vielleicht", task_id=third.id))


async def test_a_stream_waits_through_input_required(
    a2a: ClientFactory, dispatcher: None, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    streaming, plain = await a2a(m), await a2a(m, streaming=False)
    gated = [{"key": "go", "action": "noop", "requires_confirmation": True}]
    states: list[str] = []
    async for event in streaming.send_message(graph_message(gated)):
        if event.HasField("task"):
            task_id = event.task.id
            states.append(state(event.task))
        elif event.HasField("status_update"):
            states.append(pb.TaskState.Name(event.status_update.status.state))
        if states[-1] == "TASK_STATE_INPUT_REQUIRED" and len(states) == 1:
            approve = pb.Part(data=json_format.ParseDict({"approved": True}, pb.Part().data))
            message = pb.Message(message_id="yes-1", role=pb.ROLE_USER, task_id=task_id,
                                 parts=[approve])  # fmt: skip
            req = pb.SendMessageRequest(message=message)
            req.configuration.return_immediately = True
            await only_task(plain, req)
    assert states[0] == "TASK_STATE_INPUT_REQUIRED" and states[-1] == "TASK_STATE_COMPLETED"


async def test_resubscribe_after_a_drop_misses_nothing(
    a2a: ClientFactory, dispatcher: None, member_factory: MemberFactory, db: store.Store
) -> None:
    m = await member_factory()
    client = await a2a(m)
    todos = [{"key": f"s{i}", "action": "noop", "params": {"duration_ms": 60},
              "depends_on": [f"s{i - 1}"] if i else []} for i in range(6)]  # fmt: skip
    first: list[int] = []
    task_id = ""
    async for event in client.send_message(graph_message(todos)):
        if event.HasField("task"):
            task_id = event.task.id
            continue
        update = event.status_update if event.HasField("status_update") else event.artifact_update
        first.append(int(json_format.MessageToDict(update.metadata)["cpa.event_id"]))
        if len(first) == 4:
            break  # the connection drops mid-job
    second: list[int] = []
    names: list[str] = []
    context = ClientCallContext(service_parameters={"Last-Event-ID": str(first[-1])})
    stream = client.subscribe(pb.SubscribeToTaskRequest(id=task_id), context=context)
    async for event in stream:
        if event.HasField("task"):
            assert event.task.id == task_id  # the spec: the task first
            continue
        if event.HasField("artifact_update"):
            names.append(event.artifact_update.artifact.name)
        update = event.status_update if event.HasField("status_update") else event.artifact_update
        second.append(int(json_format.MessageToDict(update.metadata)["cpa.event_id"]))
    async with db.user(m.claims) as s:
        every = [int(e["id"]) for e in await s.event_list(task_id)]
    assert first + second == every  # nothing missing, nothing twice
    assert names and names[-1] == "s5"
    # Without a cursor: the current task first (all results so far), then nothing is left.
    events = [e async for e in client.subscribe(pb.SubscribeToTaskRequest(id=task_id))]
    assert [state(e.task) for e in events] == ["TASK_STATE_COMPLETED"]
    assert [a.name for a in events[0].task.artifacts] == [f"s{i}" for i in range(6)]


async def test_another_tenants_task_is_not_found(
    a2a: ClientFactory, member_factory: MemberFactory
) -> None:
    owner, other = await member_factory("one"), await member_factory("two")
    task = await only_task(
        await a2a(owner, streaming=False), graph_message([{"key": "a", "action": "noop"}], now=True)
    )
    stranger = await a2a(other, streaming=False)
    with pytest.raises(a2a_errors.TaskNotFoundError):
        await stranger.get_task(pb.GetTaskRequest(id=task.id))
    with pytest.raises(a2a_errors.TaskNotFoundError):
        await stranger.cancel_task(pb.CancelTaskRequest(id=task.id))
    with pytest.raises(a2a_errors.TaskNotFoundError):
        await only_task(stranger, text_message("ja", task_id=task.id))
    with pytest.raises(a2a_errors.TaskNotFoundError):
        [_ async for _ in (await a2a(other)).subscribe(pb.SubscribeToTaskRequest(id=task.id))]
    with pytest.raises(a2a_errors.TaskNotFoundError):
        await stranger.get_task(pb.GetTaskRequest(id="not-a-uuid"))


async def test_bad_requests_get_the_specs_error_codes(
    live_api: str, recorder: Recorder, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    headers = {**bearer(m), "A2A-Version": "1.0"}

    async def rpc(body: Any, **kw: Any) -> dict[str, Any]:
        async with httpx.AsyncClient(transport=recorder, headers=kw.pop("h", headers)) as http:
            r = await http.post(f"{live_api}/a2a", content=body if isinstance(body, bytes)
                                else json.dumps(body), **kw)  # fmt: skip
        assert r.status_code == 200, r.text
        return dict(r.json()["error"])

    send = {"jsonrpc": "2.0", "id": 1, "method": "SendMessage"}
    assert (await rpc(b"{not json"))["code"] == -32700
    nope = {"jsonrpc": "2.0", "id": 1, "method": "Nope", "params": {}}
    assert (await rpc(nope))["code"] == -32601
    no_parts = {"message": {"messageId": "m1", "role": "ROLE_USER", "parts": []}}
    assert (await rpc({**send, "params": no_parts}))["code"] == -32602
    two = {"message": {"messageId": "m2", "role": "ROLE_USER",
                       "parts": [{"text": "a"}, {"text": "b"}]}}  # fmt: skip
    error = await rpc({**send, "params": two})
    assert error["code"] == -32602 and "one text part" in error["message"]
    unknown = {"message": {"messageId": "m3", "role": "ROLE_USER", "parts": [{"text": "??"}]}}
    error = await rpc({**send, "params": unknown})  # no intent, no planner configured
    assert error["code"] == -32602 and "planner" in error["message"]
    bad_graph = {"graph": {"todos": [{"key": "a", "action": "no.such"}]}}
    params = {"message": {"messageId": "m4", "role": "ROLE_USER", "parts": [{"data": bad_graph}]}}
    assert (await rpc({**send, "params": params}))["code"] == -32602
    ok = {"message": {"messageId": "m5", "role": "ROLE_USER", "parts": [{"text": "timer 5 s"}]}}
    assert (await rpc({**send, "params": ok}, h=bearer(m)))["code"] == -32009  # no A2A-Version
    get = {"jsonrpc": "2.0", "id": 2, "method": "GetTask", "params": {"id": str(uuid.uuid4())}}
    assert (await rpc(get))["code"] == -32001
    push = {"jsonrpc": "2.0", "id": 3, "method": "ListTaskPushNotificationConfigs",
            "params": {"taskId": str(uuid.uuid4())}}  # fmt: skip
    assert (await rpc(push))["code"] == -32003
    assert recorder.validate() == 9
    async with httpx.AsyncClient() as http:  # no token: the REST API's 401
        r = await http.post(f"{live_api}/a2a", json=get, headers={"A2A-Version": "1.0"})
    assert r.status_code == 401 and r.headers["content-type"] == "application/problem+json"
    async with httpx.AsyncClient() as http:
        scraped = (await http.get(f"{live_api}/metrics")).text
    assert 'cpa_a2a_requests_total{method="GetTask",outcome="-32001"}' in scraped


async def test_the_rate_limit_and_the_body_limit_apply(
    live_api: str, wire: Any, member_factory: MemberFactory
) -> None:
    wire(rate_limit=1)
    m = await member_factory()
    headers = {**bearer(m), "A2A-Version": "1.0"}
    body = {"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": {
        "message": {"messageId": "", "role": "ROLE_USER", "parts": [{"text": "timer 5 s"}]},
        "configuration": {"returnImmediately": True}}}  # fmt: skip
    async with httpx.AsyncClient(base_url=live_api, headers=headers) as http:
        for i, status in enumerate((200, 429)):
            body["params"]["message"]["messageId"] = f"m{i}"
            r = await http.post("/a2a", json=body)
            assert r.status_code == status, r.text
        assert r.json()["code"] == "rate_limited" and "retry-after" in r.headers
        r = await http.post("/a2a", content=b"x" * (300 * 1024))
        assert r.status_code == 413


async def test_the_example_streams_a_reminder(
    live_api: str, dispatcher: None, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    env = {**os.environ, "CPA_API_URL": live_api, "CPA_TOKEN": token_for(m)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "examples" / "a2a_client.py"),
        "Erinnere mich in 3 Sekunden an den Tee", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode()
    assert proc.returncode == 0, (text, err.decode())
    assert "Erinnerung: den Tee" in text
    assert text.splitlines()[0].endswith("TASK_STATE_SUBMITTED")
    assert text.splitlines()[-1].startswith("status TASK_STATE_COMPLETED")


def test_jobs_map_to_task_states() -> None:
    assert {k: pb.TaskState.Name(v) for k, v in a2a_tasks.STATES.items()} == {
        "pending": "TASK_STATE_SUBMITTED",
        "running": "TASK_STATE_WORKING",
        "done": "TASK_STATE_COMPLETED",
        "failed": "TASK_STATE_FAILED",
        "cancelled": "TASK_STATE_CANCELED",
    }


async def test_a_new_task_kicks_the_dispatcher(
    a2a: ClientFactory, wire: Any, member_factory: MemberFactory
) -> None:
    kicked = asyncio.Event()

    async def receive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        kicked.set()
        writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(receive, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    wire(dispatch_url=f"http://127.0.0.1:{port}/kick", dispatch_secret="s" * 24)
    client = await a2a(await member_factory())
    stream = client.send_message(graph_message([{"key": "a", "action": "noop"}]))
    first = await anext(stream)  # the stream stays open: no dispatcher runs here
    assert first.HasField("task")
    await asyncio.wait_for(kicked.wait(), 5)  # before the stream's answer ends
    await stream.aclose()
    server.close()
    await server.wait_closed()


async def test_list_tasks(a2a: ClientFactory, member_factory: MemberFactory) -> None:
    m, other = await member_factory("one"), await member_factory("two")
    client = await a2a(m, streaming=False)
    made = []
    for context in ("chat-1", "chat-1", "chat-2"):
        request = graph_message([{"key": "a", "action": "noop"}], now=True)
        request.message.context_id = context
        made.append((await only_task(client, request)).id)
    first = await client.list_tasks(pb.ListTasksRequest(page_size=2))
    assert (first.total_size, first.page_size, len(first.tasks)) == (3, 2, 2)
    assert [t.id for t in first.tasks] == made[:0:-1]  # newest first
    rest = await client.list_tasks(
        pb.ListTasksRequest(page_size=2, page_token=first.next_page_token)
    )
    assert [t.id for t in rest.tasks] == made[:1] and not rest.next_page_token
    chat = await client.list_tasks(pb.ListTasksRequest(context_id="chat-1"))
    assert sorted(t.id for t in chat.tasks) == sorted(made[:2]) and chat.total_size == 2
    assert {t.context_id for t in chat.tasks} == {"chat-1"}
    waiting = await client.list_tasks(pb.ListTasksRequest(status=pb.TASK_STATE_SUBMITTED))
    assert waiting.total_size == 3
    done = await client.list_tasks(pb.ListTasksRequest(status=pb.TASK_STATE_COMPLETED))
    assert done.total_size == 0 and not done.tasks
    assert (
        await (await a2a(other, streaming=False)).list_tasks(pb.ListTasksRequest())
    ).total_size == 0
    with pytest.raises(a2a_errors.InvalidParamsError, match="pageSize"):
        await client.list_tasks(pb.ListTasksRequest(page_size=500))
    with pytest.raises(a2a_errors.InvalidParamsError, match="pageToken"):
        await client.list_tasks(pb.ListTasksRequest(page_token="nope"))
