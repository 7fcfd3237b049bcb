"""The planner against recorded OpenAI chat-completions shapes, through httpx2's MockTransport
(the openai 3.x SDK uses httpx2, which plain respx does not intercept)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
import pytest
from cpa_scheduler import catalogue, errors, executor, llm, planner

FIXTURES = Path(__file__).parents[1] / "fixtures" / "openai"
GOOD = {
    "todos": [
        {
            "key": "news",
            "action": "web.search",
            "target": "desktop",
            "params": {"query": "Wetter Berlin", "limit": None},
            "depends_on": [],
        },
        {
            "key": "mail",
            "action": "email.list_unread",
            "target": "desktop",
            "params": {"limit": 5},
            "depends_on": [],
        },
        {
            "key": "sum",
            "action": "llm.generate",
            "target": "cloud",
            "params": {
                "prompt": "Fasse zusammen",
                "inputs": [{"$ref": "news.result"}, {"$ref": "mail.result"}],
                "system": None,
                "max_tokens": None,
            },
            "depends_on": ["news", "mail"],
        },
    ]
}
CTX = executor.Context(job_id="j", todo_id="t", key="plan", tenant_id="tn")


def chat(content: Any, status: int = 200) -> httpx2.Response:
    body = (
        (FIXTURES / "chat_plan_ok.json")
        .read_text()
        .replace('"__PLAN__"', json.dumps(json.dumps(content)))
    )
    return httpx2.Response(
        status, content=body.encode(), headers={"content-type": "application/json"}
    )


def fixture(name: str, status: int) -> httpx2.Response:
    return httpx2.Response(
        status, content=(FIXTURES / name).read_bytes(), headers={"content-type": "application/json"}
    )


class Recorder:
    def __init__(self, *answers: httpx2.Response | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[dict[str, Any]] = []
        self.paths: list[str] = []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.paths.append(request.url.path)
        self.requests.append(json.loads(request.content))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def provider(self, retries: int = 0, **kw: Any) -> llm.OpenAIProvider:
        client = httpx2.AsyncClient(transport=httpx2.MockTransport(self))
        return llm.OpenAIProvider(
            model="gpt-4o-mini", api_key="sk-test", max_retries=retries, http_client=client, **kw
        )


async def test_good_plan_and_the_request_it_sends() -> None:
    rec = Recorder(chat(GOOD))
    result = await planner.Planner(rec.provider()).plan(
        "Wie wird das Wetter und was ist in meiner Mail?"
    )
    assert [t["key"] for t in result["todos"]] == ["news", "mail", "sum"]
    assert result["todos"][0]["params"] == {"query": "Wetter Berlin"}  # nulls mean absent
    assert result["usage"][0]["prompt_tokens"] == 1843 and result["cached"] is False
    body = rec.requests[0]
    assert rec.paths == ["/v1/chat/completions"]
    assert body["model"] == "gpt-4o-mini" and body["temperature"] <= 0.2
    fmt = body["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
    schema = fmt["json_schema"]["schema"]
    assert schema["additionalProperties"] is False
    variants = schema["properties"]["todos"]["items"]["anyOf"]
    actions = sorted(v["properties"]["action"]["enum"][0] for v in variants)
    assert actions == sorted(n for n in catalogue.default().names() if n != "plan")
    for v in variants:
        assert v["additionalProperties"] is False and set(v["required"]) == set(v["properties"])
        assert v["properties"]["params"]["additionalProperties"] is False
    system = body["messages"][0]["content"]
    assert (
        "Europe/Berlin" in system
        and "web.search" in system
        and "maximal safe parallelism" in system
    )


async def test_cycle_is_repaired_once() -> None:
    cyclic = {
        "todos": [
            {
                "key": "a",
                "action": "noop",
                "target": "cloud",
                "params": {"duration_ms": None},
                "depends_on": ["b"],
            },
            {
                "key": "b",
                "action": "noop",
                "target": "cloud",
                "params": {"duration_ms": None},
                "depends_on": ["a"],
            },
        ]
    }
    fixed = {
        "todos": [
            {"key": "a", "action": "noop", "target": "cloud", "params": {}, "depends_on": []},
            {"key": "b", "action": "noop", "target": "cloud", "params": {}, "depends_on": ["a"]},
        ]
    }
    rec = Recorder(chat(cyclic), chat(fixed))
    result = await planner.Planner(rec.provider()).plan("mach zwei Dinge nacheinander")
    assert [t["key"] for t in result["todos"]] == ["a", "b"] and len(result["usage"]) == 2
    repair = rec.requests[1]["messages"]
    assert repair[-2]["role"] == "assistant"
    assert "a -> b -> a" in repair[-1]["content"]


async def test_unknown_dependency_never_repaired_fails_with_the_errors() -> None:
    bad = {
        "todos": [
            {"key": "a", "action": "noop", "target": "cloud", "params": {}, "depends_on": ["ghost"]}
        ]
    }
    rec = Recorder(chat(bad), chat(bad))
    with pytest.raises(errors.PlannerError) as info:
        await planner.Planner(rec.provider()).plan("irgendwas")
    assert "depends on 'ghost'" in info.value.message and len(rec.requests) == 2
    assert info.value.errors and "ghost" in info.value.errors[0]["msg"]


async def test_refusal_is_permanent() -> None:
    rec = Recorder(fixture("chat_refusal.json", 200))
    with pytest.raises(errors.PermanentError, match="refused"):
        await planner.Planner(rec.provider()).plan("etwas Verbotenes")


async def test_429_then_success() -> None:
    limited = fixture("error_429.json", 429)
    limited.headers["retry-after-ms"] = "10"
    rec = Recorder(limited, chat(GOOD))
    result = await planner.Planner(rec.provider(retries=1)).plan("Wetter und Mail")
    assert len(result["todos"]) == 3 and len(rec.requests) == 2


async def test_timeout_is_retryable() -> None:
    rec = Recorder(httpx2.ReadTimeout("timed out"))
    with pytest.raises(errors.RetryableError, match="timed out"):
        await planner.Planner(rec.provider()).plan("langsam")


@pytest.mark.parametrize(
    ("status", "name", "error"),
    [
        (400, "error_400.json", errors.PermanentError),
        (500, "error_429.json", errors.RetryableError),
    ],
)
async def test_llm_generate_maps_provider_errors(
    status: int, name: str, error: type[Exception]
) -> None:
    rec = Recorder(fixture(name, status))
    with pytest.raises(error):
        await planner.GenerateExecutor(rec.provider())({"prompt": "Hallo"}, CTX)


async def test_llm_generate_returns_text_and_usage() -> None:
    body = (FIXTURES / "chat_plan_ok.json").read_text().replace('"__PLAN__"', '"Guten Morgen!"')
    rec = Recorder(
        httpx2.Response(200, content=body.encode(), headers={"content-type": "application/json"})
    )
    outcome = await planner.GenerateExecutor(rec.provider())(
        {"prompt": "Sag hallo", "inputs": {"name": "Anna"}}, CTX
    )
    assert isinstance(outcome, executor.Done)
    out = outcome.result
    assert out["text"] == "Guten Morgen!" and out["usage"]["completion_tokens"] == 121
    assert "response_format" not in rec.requests[0]
    assert '"name": "Anna"' in rec.requests[0]["messages"][1]["content"]


async def test_plan_executor_answers_attach_with_the_planned_todos() -> None:
    rec = Recorder(chat(GOOD))
    outcome = await planner.PlanExecutor(planner.Planner(rec.provider()))(
        {"request": "Wie wird das Wetter?"}, CTX
    )
    assert isinstance(outcome, executor.Attach)
    assert [t["key"] for t in outcome.todos] == ["news", "mail", "sum"]
    assert outcome.result["attach"] == outcome.todos and outcome.result["cached"] is False


async def test_plan_executor_reports_attach_and_refuses_reserved_keys() -> None:
    clash = {
        "todos": [
            {"key": "plan", "action": "noop", "target": "cloud", "params": {}, "depends_on": []}
        ]
    }
    rec = Recorder(chat(clash), chat(clash))
    with pytest.raises(errors.PermanentError, match="already used"):
        await planner.PlanExecutor(planner.Planner(rec.provider()))({"request": "x"}, CTX)


def test_no_provider_without_configuration() -> None:
    from cpa_scheduler import settings

    assert llm.provider_from(settings.Settings(database_url="x")) is None
    assert isinstance(
        llm.provider_from(
            settings.Settings(database_url="x", openai_base_url="http://127.0.0.1:11434/v1")
        ),
        llm.OpenAIProvider,
    )
    reg = planner.registry_for(settings.Settings(database_url="x"), None)
    assert "plan" not in reg and "llm.generate" not in reg


Factory = Callable[..., Any]
