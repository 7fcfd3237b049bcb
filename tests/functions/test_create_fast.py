"""``POST /v1/jobs``'s shortcut (api.jobs._CreateRoute): the common request skips FastAPI's
parameter resolution, every other one goes through FastAPI's handler. Both must answer alike:
the same job, the same errors in the same order (JSON decoding, then the token, then the
body), and the shortcut must really be the one taking the common request."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from cpa_scheduler.api import jobs

from tests.conftest import MemberFactory
from tests.functions.conftest import bearer

GRAPH = {"todos": [{"key": "a", "action": "noop"},
                   {"key": "b", "action": "noop", "depends_on": ["a"]}]}  # fmt: skip


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bool]]:
    """Whether the shortcut answered each request (True) or left it to FastAPI (False)."""
    seen: list[bool] = []
    real = jobs._create_fast

    async def spy(request: Any) -> Any:
        answer = await real(request)
        seen.append(answer is not None)
        return answer

    monkeypatch.setattr(jobs, "_create_fast", spy)
    yield seen


def _comparable(job: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in job.items() if k not in ("id", "created_at")}
    out["todos"] = [{k: v for k, v in t.items() if k != "id"} for t in job["todos"]]
    return out


async def test_the_shortcut_answers_what_fastapi_answers(
    client: httpx.AsyncClient, member_factory: MemberFactory, taken: list[bool]
) -> None:
    m = await member_factory()
    fast = await client.post("/v1/jobs", json={"graph": GRAPH}, headers=bearer(m))
    # A charset parameter is valid JSON for FastAPI, but not the shortcut's exact match.
    slow = await client.post(
        "/v1/jobs",
        content=httpx.Request("POST", "/", json={"graph": GRAPH}).content,
        headers={**bearer(m), "content-type": "application/json; charset=utf-8"},
    )
    assert taken == [True, False]
    assert fast.status_code == slow.status_code == 201, (fast.text, slow.text)
    assert fast.headers["content-type"] == slow.headers["content-type"] == "application/json"
    assert _comparable(fast.json()) == _comparable(slow.json())
    got = await client.get(f"/v1/jobs/{fast.json()['id']}", headers=bearer(m))
    assert got.status_code == 200  # committed before the answer


async def test_a_text_request_and_a_chosen_tenant_take_the_shortcut(
    client: httpx.AsyncClient, member_factory: MemberFactory, taken: list[bool]
) -> None:
    m = await member_factory()
    r = await client.post(
        "/v1/jobs",
        json={"request": "Stell einen Timer auf 1 Sekunden", "time_zone": "Europe/Berlin"},
        headers={**bearer(m), "X-CPA-Tenant": str(m.tenant_id)},
    )
    assert r.status_code == 201, r.text
    assert r.json()["intent"] == "timer" and r.json()["tenant_id"] == str(m.tenant_id)
    assert taken == [True]


@pytest.mark.parametrize(
    ("case", "status"),
    [
        ("bad json, no token", 422),  # FastAPI decodes the body before the dependencies run
        ("good json, no token", 401),
        ("good json, bad token", 401),
        ("bad body, good token", 422),
        ("bad body, no token", 401),  # the token before the body model
        ("neither request nor graph", 422),
        ("bad tenant header", 422),
        ("unknown action", 422),
        ("bad zone", 422),
    ],
)
async def test_errors_keep_fastapis_order_and_shape(
    client: httpx.AsyncClient, member_factory: MemberFactory, case: str, status: int
) -> None:
    m = await member_factory()
    good = bearer(m)
    body: Any = {"graph": GRAPH}
    headers: dict[str, str] = dict(good)
    raw: bytes | None = None
    if case.startswith("bad json"):
        raw, headers = b'{"graph": ', {}
    elif case == "good json, no token":
        headers = {}
    elif case == "good json, bad token":
        headers = {"Authorization": "Bearer not-a-token"}
    elif case.startswith("bad body"):
        body = {"graph": {"todos": "x"}, "priority": 99}
        headers = good if case.endswith("good token") else {}
    elif case == "neither request nor graph":
        body = {"priority": 1}
    elif case == "bad tenant header":
        headers = {**good, "X-CPA-Tenant": "nope"}
    elif case == "unknown action":
        body = {"graph": {"todos": [{"key": "a", "action": "nope"}]}}
    elif case == "bad zone":
        body = {"request": "Erinnere mich morgen um 9 an X", "time_zone": "Mars/Base"}
    content = raw if raw is not None else httpx.Request("POST", "/", json=body).content
    answers = []
    for ctype in ("application/json", "application/json; charset=utf-8"):  # shortcut, FastAPI
        r = await client.post(
            "/v1/jobs", content=content, headers={**headers, "content-type": ctype}
        )
        assert r.status_code == status, (case, ctype, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
        answers.append(r.json())
    assert answers[0] == answers[1]


def test_the_shortcut_knows_every_parameter_of_create_job() -> None:
    """The shortcut resolves create_job's parameters itself. A dependency added to create_job
    (an ownership or auth check, say) would be skipped by it: this fails until the shortcut
    does the same (or declines such requests) and the list below is updated."""
    import inspect

    params = inspect.signature(jobs.create_job).parameters
    assert list(params) == [
        "body",
        "app",
        "claims",
        "background",
        "idempotency_key",
        "x_cpa_tenant",
    ], "create_job's parameters changed: make api.jobs._create_fast resolve the new ones too"
    route = next(
        r for r in jobs.router.routes
        if getattr(r, "endpoint", None) is jobs.create_job
    )  # fmt: skip
    calls = sorted(d.call.__name__ for d in route.dependant.dependencies if d.call is not None)
    assert calls == ["get_claims", "get_state"], calls
