"""The timed-work contract over HTTP: time_zone, run_at, 422s that quote the text, schedules."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import pytest

from tests.conftest import MemberFactory
from tests.functions.conftest import bearer
from tests.functions.test_api import is_problem


async def test_times_are_read_in_the_callers_zone(
    client: httpx.AsyncClient, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    r = await client.post(
        "/v1/jobs", headers=bearer(m),
        json={"request": "Erinnere mich morgen um 9 an den Zahnarzt", "time_zone": "Europe/Berlin"},
    )  # fmt: skip
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["run_at"] is None and job["schedule_id"] is None
    (remind,) = job["todos"]  # no agent offers reminder.create: the cloud notification alone
    assert remind["action"] == "notify" and remind["target"] == "cloud"
    at = datetime.fromisoformat(remind["run_at"])
    local = at.astimezone(__import__("zoneinfo").ZoneInfo("Europe/Berlin"))
    assert (local.hour, local.minute) == (9, 0) and at > datetime.now(UTC)


async def test_run_at_for_a_whole_job(
    client: httpx.AsyncClient, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    at = (datetime.now(UTC) + timedelta(hours=2)).replace(microsecond=0)
    graph = {"todos": [{"key": "a", "action": "noop"}, {"key": "b", "action": "noop",
                                                        "depends_on": ["a"]}]}  # fmt: skip
    r = await client.post(
        "/v1/jobs", headers=bearer(m), json={"graph": graph, "run_at": at.isoformat()}
    )
    assert r.status_code == 201, r.text
    job = r.json()
    assert datetime.fromisoformat(job["run_at"]) == at
    assert [datetime.fromisoformat(t["run_at"]) for t in job["todos"]] == [at, at]


@pytest.mark.parametrize(
    ("body", "quoted"),
    [
        ({"request": "Check my email", "time_zone": "Mars/Olympus"}, "'Mars/Olympus'"),
        ({"request": "Erinnere mich morgen um 25 Uhr an den Tee"}, "'morgen um 25 Uhr'"),
        ({"request": "Check my email", "run_at": "2020-01-01T08:00:00+01:00"}, "2020-01-01"),
        ({"request": "Check my email", "run_at": "2030-01-01T08:00:00"}, "timezone"),
    ],
)
async def test_bad_times_are_422_that_quote_them(
    client: httpx.AsyncClient, member_factory: MemberFactory, body: dict[str, str], quoted: str
) -> None:
    m = await member_factory()
    problem = is_problem(await client.post("/v1/jobs", headers=bearer(m), json=body), 422)
    assert quoted in str(problem), problem


async def test_schedule_routes(client: httpx.AsyncClient, member_factory: MemberFactory) -> None:
    a, b = await member_factory("A"), await member_factory("B")
    body = {"cron": "0 8 * * 1", "time_zone": "Europe/Berlin", "request": "Check my email"}
    r = await client.post("/v1/schedules", headers=bearer(a), json=body)
    assert r.status_code == 201, r.text
    sched = r.json()
    for field in ("id", "cron", "time_zone", "paused", "next_run_at", "created_at", "request",
                  "graph"):  # fmt: skip
        assert field in sched
    assert sched["paused"] is False and sched["graph"] is None
    assert datetime.fromisoformat(sched["next_run_at"]).weekday() in (0, 6)  # Monday 08:00 Berlin
    listed = (await client.get("/v1/schedules", headers=bearer(a))).json()
    assert [s["id"] for s in listed["schedules"]] == [sched["id"]]
    path = f"/v1/schedules/{sched['id']}"
    assert (await client.get(path, headers=bearer(a))).json()["id"] == sched["id"]
    paused = await client.post(f"{path}/pause", headers=bearer(a))
    assert paused.status_code == 200 and paused.json()["paused"] is True
    resumed = await client.post(f"{path}/resume", headers=bearer(a))
    assert resumed.status_code == 200 and resumed.json()["paused"] is False
    for method, p in [("GET", path), ("POST", f"{path}/pause"), ("POST", f"{path}/resume"),
                      ("DELETE", path)]:  # fmt: skip
        is_problem(await client.request(method, p, headers=bearer(b)), 404, "not_found")
    assert (await client.get("/v1/schedules", headers=bearer(b))).json()["schedules"] == []
    deleted = await client.delete(path, headers=bearer(a))
    assert deleted.status_code == 204 and deleted.content == b""
    is_problem(await client.get(path, headers=bearer(a)), 404)


async def test_schedule_with_a_graph(
    client: httpx.AsyncClient, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    graph = {"todos": [{"key": "ping", "action": "notify", "params": {"message": "hi"}}]}
    r = await client.post("/v1/schedules", headers=bearer(m),
                          json={"cron": "*/10 * * * *", "graph": graph})  # fmt: skip
    assert r.status_code == 201, r.text
    assert r.json()["graph"]["todos"][0]["key"] == "ping" and r.json()["time_zone"] == "UTC"


@pytest.mark.parametrize(
    ("body", "quoted"),
    [
        ({"cron": "61 8 * * *", "request": "Check my email"}, "'61 8 * * *'"),
        ({"cron": "0 8 * * *", "time_zone": "Berlin", "request": "Check my email"}, "'Berlin'"),
        ({"cron": "0 8 * * *", "request": "Remind me in 5 minutes to stretch"}, "in 5 minutes"),
        (
            {
                "cron": "0 8 * * *",
                "graph": {
                    "todos": [{"key": "x", "action": "noop", "run_at": "2030-01-01T08:00:00Z"}]
                },
            },
            "x",
        ),
    ],
)
async def test_bad_schedules_are_422(
    client: httpx.AsyncClient, member_factory: MemberFactory, body: dict[str, str], quoted: str
) -> None:
    m = await member_factory()
    problem = is_problem(await client.post("/v1/schedules", headers=bearer(m), json=body), 422)
    assert quoted in str(problem), problem


async def test_a_recurring_request_answers_with_the_schedule(
    client: httpx.AsyncClient, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    r = await client.post("/v1/jobs", headers=bearer(m), json={
        "request": "every day at 7am check my email", "time_zone": "America/New_York"})  # fmt: skip
    assert r.status_code == 201, r.text
    assert r.json()["intent"] == "schedule"
    (sched,) = (await client.get("/v1/schedules", headers=bearer(m))).json()["schedules"]
    assert sched["cron"] == "0 7 * * *" and sched["time_zone"] == "America/New_York"
    assert sched["id"] in r.json()["todos"][0]["params"]["message"]


async def test_a_repeated_recurring_request_adds_one_schedule(
    client: httpx.AsyncClient, member_factory: MemberFactory
) -> None:
    m = await member_factory()
    headers = {**bearer(m), "Idempotency-Key": "weekly-bins"}
    body = {"request": "Jeden Montag um 8 Uhr erinnere mich an den Müll"}
    first = await client.post("/v1/jobs", headers=headers, json=body)
    again = await client.post("/v1/jobs", headers=headers, json=body)
    assert first.status_code == again.status_code == 201
    assert first.json()["id"] == again.json()["id"]
    assert len((await client.get("/v1/schedules", headers=bearer(m))).json()["schedules"]) == 1
