"""Executor registry and built-ins; http.request through respx with an SSRF guard."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import respx
from cpa_scheduler import errors, executor

CTX = executor.Context(job_id="j", todo_id="t", key="k", tenant_id="tn")


def done(outcome: executor.Outcome) -> Any:
    """The result of a Done outcome."""
    assert isinstance(outcome, executor.Done), outcome
    return outcome.result


async def fake_resolver(host: str, port: int) -> list[str]:
    table = {
        "api.example.com": ["93.184.215.14"],
        "intranet.example.com": ["10.1.2.3"],
        "sneaky.example.com": ["93.184.215.14", "127.0.0.1"],
        "metadata.example.com": ["169.254.169.254"],
        "v6.example.com": ["2606:4700::6810:85e5"],
    }
    return table[host]


def test_registering_twice_fails() -> None:
    reg = executor.Registry()
    reg.register("noop", executor.noop)
    with pytest.raises(errors.RegistryError, match="already registered"):
        reg.register("noop", executor.noop)


def test_unknown_action_has_no_executor() -> None:
    with pytest.raises(errors.RegistryError, match="'desktop.open_app'"):
        executor.builtin().get("desktop.open_app")


def test_llm_actions_are_known_but_unavailable_without_a_provider() -> None:
    registry = executor.builtin()
    assert "plan" not in registry and "llm.generate" not in registry
    with pytest.raises(errors.PermanentError, match="No LLM provider is configured, so 'plan'"):
        registry.get("plan")
    registry.register("plan", executor.noop)  # what the planner does with a provider
    assert registry.get("plan") is executor.noop


def test_builtin_actions() -> None:
    assert executor.builtin().actions() == ["http.request", "noop", "notify", "wait"]


async def test_noop_returns_params() -> None:
    assert await executor.noop({"a": 1}, CTX) == executor.Done({"a": 1})


async def test_wait_snoozes_first_and_is_done_after_its_timer() -> None:
    before = datetime.now(UTC)
    first = await executor.wait({"seconds": 3}, CTX)
    assert isinstance(first, executor.Snooze)
    assert before + timedelta(seconds=3) <= first.until <= datetime.now(UTC) + timedelta(seconds=3)
    again = replace(CTX, timer_until=first.until)
    assert await executor.wait({"seconds": 3}, again) == executor.Done({"waited_seconds": 3})
    with pytest.raises(errors.PermanentError, match="non-negative number of seconds"):
        await executor.wait({"seconds": -1}, CTX)


async def test_notify_emits_an_event() -> None:
    seen: list[tuple[str, dict[str, Any]]] = []

    async def emit(kind: str, data: dict[str, Any]) -> None:
        seen.append((kind, data))

    ctx = executor.Context(job_id="j", todo_id="t", key="ring", tenant_id="tn", emit=emit)
    result = done(await executor.notify({"message": "Tee ist fertig"}, ctx))
    assert result["delivered"] is True
    assert seen == [
        (
            "notification",
            {"todo_key": "ring", "title": "CPA", "message": "Tee ist fertig", "level": "info"},
        )
    ]


@respx.mock
async def test_http_request_to_a_public_host() -> None:
    route = respx.post("https://api.example.com/v1/x").mock(
        return_value=httpx.Response(200, json={"ok": True})
    )
    http = executor.HttpRequest(resolver=fake_resolver)
    result = done(
        await http(
            {
                "url": "https://api.example.com/v1/x",
                "method": "POST",
                "json": {"a": 1},
                "headers": {"X-T": "1"},
            },
            CTX,
        )
    )
    assert result["status"] == 200 and result["json"] == {"ok": True}
    sent = route.calls.last.request
    assert sent.headers["X-T"] == "1" and sent.content == b'{"a":1}'


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000/admin",
        "http://localhost.example/",
        "https://intranet.example.com/",
        "https://sneaky.example.com/",
        "http://metadata.example.com/latest/meta-data",
        "http://[::1]/",
        "http://169.254.169.254/",
        "http://192.168.1.1/",
    ],
)
async def test_private_targets_are_refused(url: str) -> None:
    async def resolver(host: str, port: int) -> list[str]:
        return ["127.0.0.1"] if host == "localhost.example" else await fake_resolver(host, port)

    with respx.mock(assert_all_called=False) as mock:
        route = mock.route().mock(return_value=httpx.Response(200))
        http = executor.HttpRequest(resolver=resolver)
        with pytest.raises(errors.TargetRefusedError, match="private, loopback or link-local"):
            await http({"url": url}, CTX)
    assert not route.called


@respx.mock
async def test_allow_list_permits_a_private_target() -> None:
    respx.get("http://127.0.0.1:9/health").mock(return_value=httpx.Response(200, text="up"))
    http = executor.HttpRequest(allow=["127.0.0.0/8"], resolver=fake_resolver)
    result = done(await http({"url": "http://127.0.0.1:9/health"}, CTX))
    assert result["text"] == "up"
    by_host = executor.HttpRequest(allow=["intranet.example.com"], resolver=fake_resolver)
    respx.get("https://intranet.example.com/").mock(return_value=httpx.Response(204))
    assert done(await by_host({"url": "https://intranet.example.com/"}, CTX))["status"] == 204


@respx.mock
async def test_ipv6_public_is_allowed() -> None:
    respx.get("https://v6.example.com/").mock(return_value=httpx.Response(200))
    http = executor.HttpRequest(resolver=fake_resolver)
    assert done(await http({"url": "https://v6.example.com/"}, CTX))["status"] == 200


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (503, errors.RetryableError),
        (429, errors.RetryableError),
        (404, errors.PermanentError),
    ],
)
@respx.mock
async def test_status_codes_map_to_retry_or_permanent(status: int, error: type[Exception]) -> None:
    respx.get("https://api.example.com/").mock(return_value=httpx.Response(status))
    with pytest.raises(error, match=str(status)):
        await executor.HttpRequest(resolver=fake_resolver)({"url": "https://api.example.com/"}, CTX)


@respx.mock
async def test_timeouts_are_retryable() -> None:
    respx.get("https://api.example.com/slow").mock(side_effect=httpx.ReadTimeout("slow"))
    with pytest.raises(errors.RetryableError, match="timed out"):
        await executor.HttpRequest(resolver=fake_resolver)(
            {"url": "https://api.example.com/slow"}, CTX
        )


async def test_non_http_url_is_permanent() -> None:
    with pytest.raises(errors.PermanentError, match="absolute http"):
        await executor.HttpRequest(resolver=fake_resolver)({"url": "file:///etc/passwd"}, CTX)


@pytest.mark.parametrize(
    "address",
    [
        "::127.0.0.1",  # IPv4-compatible
        "::ffff:127.0.0.1",  # IPv4-mapped
        "::ffff:10.0.0.1",
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
        "64:ff9b:1::a00:1",
        "2002:7f00:1::",  # 6to4 of 127.0.0.1
        "2002:c0a8:101::1",  # 6to4 of 192.168.1.1
        "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
    ],
)
async def test_ipv6_forms_that_embed_ipv4_are_refused(address: str) -> None:
    http = executor.HttpRequest(resolver=fake_resolver)
    with pytest.raises(errors.TargetRefusedError, match="embeds an IPv4"):
        await http.check_target(f"http://[{address}]/")

    async def resolver(host: str, port: int) -> list[str]:
        return [address]

    named = executor.HttpRequest(resolver=resolver)
    with pytest.raises(errors.TargetRefusedError, match="embeds an IPv4"):
        await named.check_target("https://rebind.example.com/")


async def test_a_public_ipv6_address_passes_the_check() -> None:
    http = executor.HttpRequest(resolver=fake_resolver)
    assert await http.check_target("https://v6.example.com/") == "2606:4700::6810:85e5"


async def test_the_connection_goes_to_the_vetted_address_only() -> None:
    """DNS rebinding: the host is resolved once, and the connection uses that address. The
    name does not resolve at all outside the fake resolver, so reaching the server proves it."""
    import asyncio

    seen: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    answers = [["127.0.0.1"], ["10.0.0.1"]]  # a rebinding resolver: safe first, private after

    async def resolver(host: str, port: int) -> list[str]:
        return answers.pop(0)

    try:
        http = executor.HttpRequest(allow=["127.0.0.1/32"], resolver=resolver)
        result = done(await http({"url": f"http://rebind.invalid:{port}/x"}, CTX))
    finally:
        server.close()
        await server.wait_closed()
    assert result["status"] == 200 and result["text"] == "ok"
    assert answers == [["10.0.0.1"]]  # resolved exactly once
    assert b"host: rebind.invalid" in seen[0].lower()
