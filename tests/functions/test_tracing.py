"""One trace across processes: the API request, the dispatcher pass, each ToDo, its outbound
call and a desktop agent's answer, received by an OTLP/HTTP endpoint in the test."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from tests.conftest import MemberFactory
from tests.functions.conftest import ISSUER, SECRET, bearer, free_port


@dataclass
class Span:
    name: str
    service: str
    trace_id: str
    span_id: str
    parent: str
    kind: int
    attributes: dict[str, Any]
    links: list[tuple[str, str]] = field(default_factory=list)


class Receiver(ThreadingHTTPServer):
    """OTLP/HTTP (protobuf) on /v1/traces; also answers GET /target for http.request ToDos."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def snapshot(self) -> list[Span]:
        with self.lock:
            return list(self.spans)


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        body = b'{"ok": true}'
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers["content-length"]))
        assert self.path == "/v1/traces", self.path
        request = trace_service_pb2.ExportTraceServiceRequest()
        request.ParseFromString(raw)
        spans = []
        for rs in request.resource_spans:
            attrs = {a.key: a.value.string_value for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    spans.append(
                        Span(
                            name=s.name,
                            service=attrs.get("service.name", ""),
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent=s.parent_span_id.hex(),
                            kind=s.kind,
                            attributes={a.key: a.value for a in s.attributes},
                            links=[(ln.trace_id.hex(), ln.span_id.hex()) for ln in s.links],
                        )
                    )
        with self.server.lock:
            self.server.spans.extend(spans)
        body = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def traced_env(db_url: str, receiver: Receiver, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(
        DATABASE_URL=db_url,
        SUPABASE_JWT_SECRET=SECRET,
        SUPABASE_URL=ISSUER.removesuffix("/auth/v1"),
        CPA_DATA_DIR=str(tmp_path / "data"),
        CPA_HTTP_ALLOW="127.0.0.1/32",
        CPA_LOG_LEVEL="warning",
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url,
        OTEL_BSP_SCHEDULE_DELAY="100",
    )
    return env


@pytest.fixture
def traced_api(db_url: str, receiver: Receiver, tmp_path: Path) -> Iterator[str]:
    """The API alone (no dispatcher) under uvicorn, in its own process, tracing on."""
    port = free_port()
    log = tmp_path / "api.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "cpa_scheduler.api:app", "--host", "127.0.0.1",
             "--port", str(port), "--lifespan", "off", "--log-level", "warning"],
            env=traced_env(db_url, receiver, tmp_path), stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(20)


def wait_spans(receiver: Receiver, names: set[str], seconds: float = 15) -> list[Span]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        spans = receiver.snapshot()
        if names <= {s.name for s in spans}:
            return spans
        time.sleep(0.1)
    raise AssertionError(f"missing spans {names - {s.name for s in receiver.snapshot()}}")


def one(spans: list[Span], name: str) -> Span:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, (name, found)
    return found[0]


async def test_one_trace_from_the_request_to_every_todo_across_processes(
    traced_api: str,
    receiver: Receiver,
    member_factory: MemberFactory,
    db_url: str,
    tmp_path: Path,
) -> None:
    member = await member_factory()
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    graph = {"todos": [
        {"key": "first", "action": "noop"},
        {"key": "fetch", "action": "http.request", "depends_on": ["first"],
         "params": {"url": f"{receiver.url}/target"}},
        {"key": "open", "action": "desktop.open_app", "target": "desktop",
         "params": {"app": "Notes"}},
    ]}  # fmt: skip
    async with httpx.AsyncClient(base_url=traced_api, timeout=10) as api:
        headers = bearer(member) | {"traceparent": f"00-{trace_id}-{client_span}-01"}
        created = await api.post("/v1/jobs", json={"graph": graph}, headers=headers)
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]

        # The dispatcher: another process, started later, one pass as the scheduled function.
        dispatched = subprocess.run(
            [sys.executable, "-m", "cpa_scheduler.cli", "dispatch", "--once", "--budget", "10"],
            env=traced_env(db_url, receiver, tmp_path), capture_output=True, text=True,
            timeout=60, check=False,
        )  # fmt: skip
        assert dispatched.returncode == 0, dispatched.stderr
        assert '"done": 2' in dispatched.stdout, dispatched.stdout

        # A desktop agent: the assign carries the trace, the answer continues it.
        claimed = await api.post("/v1/agents/claim", headers=bearer(member),
                                 json={"agent_id": "desk", "actions": ["desktop.open_app"]})  # fmt: skip
        assert claimed.status_code == 200, claimed.text
        (assign,) = claimed.json()
        assert assign["trace_id"] == trace_id
        traceparent = assign["payload"]["traceparent"]
        assert traceparent.split("-")[1] == trace_id
        done = {"type": "done", "sender": "desk", "receiver": "scheduler",
                "conversation_id": job_id, "in_reply_to": assign["id"], "trace_id": trace_id,
                "payload": {"todo_id": assign["payload"]["todo_id"], "result": {"ok": True}}}  # fmt: skip
        answered = await api.post("/v1/messages", json=done,
                                  headers=bearer(member) | {"traceparent": traceparent})  # fmt: skip
        assert answered.json()["type"] == "agree", answered.text
        job = (await api.get(f"/v1/jobs/{job_id}", headers=bearer(member))).json()
        assert job["status"] == "done", job

        # No traceparent header: a protocol message's own trace_id names the trace.
        message_trace = secrets.token_hex(16)
        request = {"type": "request", "sender": "desk", "receiver": "scheduler",
                   "trace_id": message_trace, "payload": {"graph": {"todos": [
                       {"key": "x", "action": "noop"}]}}}  # fmt: skip
        agreed = await api.post("/v1/messages", json=request, headers=bearer(member))
        assert agreed.json()["type"] == "agree", agreed.text

    spans = wait_spans(receiver, {
        "POST /v1/jobs", "cpa.job.create", "cpa.dispatch.pass", "cpa.dispatch.claim",
        "cpa.todo.run noop", "cpa.todo.run http.request", "cpa.agent.assign desktop.open_app",
        "POST /v1/messages", "cpa.message request",
    })  # fmt: skip
    request = next(s for s in spans if s.name == "POST /v1/jobs" and s.kind == 2)  # SERVER
    assert (request.trace_id, request.parent) == (trace_id, client_span)
    create = one([s for s in spans if s.trace_id == trace_id], "cpa.job.create")
    assert (create.trace_id, create.parent, create.service) == (
        trace_id, request.span_id, "cpa-scheduler-api")  # fmt: skip
    # The job insert is a database span under the creation span.
    assert any(s.parent == create.span_id and s.kind == 3 for s in spans), "no SQL span"

    claims = [s for s in spans if s.name == "cpa.dispatch.claim"]
    passes = [s for s in spans if s.name == "cpa.dispatch.pass"]
    assert claims and all(c.trace_id == trace_id and c.parent == create.span_id for c in claims)
    assert all(c.service == "cpa-scheduler-dispatcher" for c in claims)
    # The pass has its own trace (it may serve many jobs) and each claim span links to it.
    pass_ids = {(p.trace_id, p.span_id) for p in passes}
    assert all(set(c.links) & pass_ids for c in claims)
    claim_ids = {c.span_id for c in claims}
    noop, fetch = one(spans, "cpa.todo.run noop"), one(spans, "cpa.todo.run http.request")
    for run in (noop, fetch):
        assert run.trace_id == trace_id and run.parent in claim_ids, run
    outbound = [s for s in spans if s.parent == fetch.span_id and s.kind == 3]  # CLIENT
    assert [s.name for s in outbound] == ["GET"], outbound

    assigned = one(spans, "cpa.agent.assign desktop.open_app")
    assert (assigned.trace_id, assigned.parent) == (trace_id, create.span_id)
    answer = next(s for s in spans if s.name == "POST /v1/messages" and s.kind == 2)
    assert (answer.trace_id, answer.parent) == (trace_id, assigned.span_id)

    by_message = one(spans, "cpa.message request")
    assert by_message.trace_id == message_trace
    created_by_message = [
        s for s in spans if s.name == "cpa.job.create" and s.parent == by_message.span_id
    ]
    assert [s.trace_id for s in created_by_message] == [message_trace]
