"""Executors run cloud ToDos: an async interface, typed outcomes, a registry, and the built-ins.

An executor gets the ToDo's params (``$ref`` already resolved) and a :class:`Context`, and
answers an :data:`Outcome`: :class:`Done` with a JSON-ready result, :class:`Snooze` to run
again later, :class:`Attach` to add ToDos to the job, or :class:`Fail`. Raising
:class:`~cpa_scheduler.errors.RetryableError` (the dispatcher backs off and retries) or
:class:`~cpa_scheduler.errors.PermanentError` (the ToDo fails now) is the same as answering
:class:`Fail`; the dispatcher acts on the outcome and never on the action's name.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from cpa_scheduler import errors

if TYPE_CHECKING:
    import httpx

Emit = Callable[[str, dict[str, Any]], Awaitable[None]]
Resolver = Callable[[str, int], Awaitable[list[str]]]


async def _no_emit(kind: str, data: dict[str, Any]) -> None:
    return None


@dataclass(frozen=True)
class Context:
    """What an executor may know about the ToDo it runs."""

    job_id: str
    todo_id: str
    key: str
    tenant_id: str
    attempt: int = 1
    emit: Emit = field(default=_no_emit)
    # The end of the snooze this ToDo has already served; None on its first run.
    timer_until: datetime | None = None


# --- outcomes --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Done:
    """The ToDo is done; ``result`` (JSON-ready) is stored and its dependents may start."""

    result: Any = None


@dataclass(frozen=True, slots=True)
class Snooze:
    """Hand the ToDo back until ``until`` without holding a worker; it then runs again."""

    until: datetime


@dataclass(frozen=True, slots=True)
class Attach:
    """Add ``todos`` (rows as job creation takes them) to the job, then finish with ``result``.

    Both happen in one transaction; ToDos that cannot be attached fail this ToDo instead.
    """

    todos: list[dict[str, Any]]
    result: Any = None


@dataclass(frozen=True, slots=True)
class Fail:
    """The ToDo failed with ``error``; ``retryable`` ones are retried with backoff."""

    error: str
    retryable: bool = False


Outcome = Done | Snooze | Attach | Fail


class Executor(Protocol):
    """Runs one ToDo."""

    async def __call__(self, params: dict[str, Any], ctx: Context) -> Outcome: ...


class Registry:
    """Executors by action name; registering an action twice is an error.

    An action may also be known but unavailable here (``plan`` without an LLM provider): its
    lookup then fails with the reason given to :meth:`unavailable`.
    """

    def __init__(self) -> None:
        self._executors: dict[str, Executor] = {}
        self._reasons: dict[str, str] = {}

    def register(self, action: str, executor: Executor) -> None:
        """Register ``executor`` for ``action``."""
        if action in self._executors:
            raise errors.RegistryError(
                f"An executor for {action!r} is already registered; register each action once."
            )
        self._executors[action] = executor

    def unavailable(self, action: str, reason: str) -> None:
        """Say why ``action`` cannot run until an executor for it is registered."""
        self._reasons[action] = reason

    def get(self, action: str) -> Executor:
        try:
            return self._executors[action]
        except KeyError:
            if action in self._reasons:
                raise errors.PermanentError(self._reasons[action]) from None
            raise errors.RegistryError(
                f"No executor is registered for {action!r}; it cannot run in the cloud."
            ) from None

    def __contains__(self, action: object) -> bool:
        return action in self._executors

    def actions(self) -> list[str]:
        return sorted(self._executors)


# --- built-ins -----------------------------------------------------------------------------


NO_LLM = (
    "No LLM provider is configured, so {action!r} cannot run; "
    "set OPENAI_API_KEY or OPENAI_BASE_URL."
)
LLM_ACTIONS = ("llm.generate", "plan")  # registered by the planner when a provider is configured


async def noop(params: dict[str, Any], ctx: Context) -> Outcome:
    """Returns its params; ``duration_ms`` makes it take that long (benchmarks, tests)."""
    duration = params.get("duration_ms")
    if isinstance(duration, int | float) and duration > 0:
        await asyncio.sleep(duration / 1000)
    return Done(params)


async def wait(params: dict[str, Any], ctx: Context) -> Outcome:
    """A timer: the first run snoozes for ``seconds`` (no worker waits), the second is done."""
    seconds = params.get("seconds")
    if not isinstance(seconds, int | float) or isinstance(seconds, bool) or seconds < 0:
        raise errors.PermanentError(
            f"The wait ToDo {ctx.key!r} needs a non-negative number of seconds, got {seconds!r}."
        )
    if ctx.timer_until is None:
        return Snooze(datetime.now(UTC) + timedelta(seconds=float(seconds)))
    return Done({"waited_seconds": seconds})


async def notify(params: dict[str, Any], ctx: Context) -> Outcome:
    """Emits a notification event that the desktop shows."""
    note = {
        "title": params.get("title") or "CPA",
        "message": str(params.get("message", "")),
        "level": params.get("level") or "info",
    }
    await ctx.emit("notification", {"todo_key": ctx.key, **note})
    return Done({"delivered": True, **note})


async def _system_resolve(host: str, port: int) -> list[str]:
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise errors.RetryableError(f"The host {host!r} could not be resolved: {exc}.") from None
    return sorted({str(info[4][0]) for info in infos})


class HttpRequest:
    """``http.request``: an outbound HTTP call guarded against private and loopback targets.

    ``allow`` lists hosts or CIDR networks that may be reached even though they are not
    public (e.g. ``127.0.0.1/32`` in tests, an internal API in production).
    """

    def __init__(
        self,
        *,
        allow: Iterable[str] = (),
        resolver: Resolver = _system_resolve,
        client: httpx.AsyncClient | None = None,
        timeout: float = 10.0,
        max_body: int = 100_000,
    ) -> None:
        self._hosts = {a.lower() for a in allow if not _is_network(a)}
        self._nets = [ipaddress.ip_network(a, strict=False) for a in allow if _is_network(a)]
        self._resolver = resolver
        self._client = client
        self._timeout = timeout
        self._max_body = max_body

    async def check_target(self, url: str) -> str | None:
        """Raise :class:`TargetRefusedError` unless every address of the URL's host is public.

        Answers the vetted address the request must connect to (None for a host on the allow
        list): resolving again at connect time would let DNS rebinding swap in a private one.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise errors.PermanentError(f"The URL {url!r} must be an absolute http(s) URL.")
        host = parts.hostname.lower()
        if host in self._hosts:
            return None
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            addresses = [str(ipaddress.ip_address(host))]
        except ValueError:
            addresses = await self._resolver(host, port)
        if not addresses:
            raise errors.RetryableError(f"The host {host!r} has no address.")
        for address in addresses:
            refused = self.refusal(ipaddress.ip_address(address))
            if refused is not None:
                raise errors.TargetRefusedError(
                    f"The URL {url!r} resolves to {address}, {refused}; outbound requests may "
                    "only reach public hosts unless CPA_HTTP_ALLOW lists it."
                )
        return addresses[0]

    def refusal(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
        """Why an address may not be reached, or None when it may."""
        if any(ip in net for net in self._nets):
            return None
        if ip.is_loopback or ip.is_unspecified:
            return "a private, loopback or link-local address"
        if isinstance(ip, ipaddress.IPv6Address) and _embeds_ipv4(ip):
            return "an IPv6 address that embeds an IPv4 address (mapped, compatible, NAT64 or 6to4)"
        if not ip.is_global or ip.is_multicast:
            return "a private, loopback or link-local address"
        return None

    async def __call__(self, params: dict[str, Any], ctx: Context) -> Outcome:
        url = str(params["url"])
        pinned = await self.check_target(url)
        method = str(params.get("method", "GET"))
        headers = {str(k): str(v) for k, v in (params.get("headers") or {}).items()}
        timeout = float(params.get("timeout", self._timeout))
        content = str(params["body"]).encode() if "body" in params else None
        import httpx  # deferred: most processes never make an outbound call

        try:
            # Redirects are not followed: a public host could redirect to a private one.
            client = self._client or httpx.AsyncClient(
                follow_redirects=False, transport=_pinned_transport(url, pinned)
            )
            try:
                response = await client.request(
                    method,
                    url,
                    headers=headers,
                    timeout=timeout,
                    json=params.get("json"),
                    content=content,
                )
            finally:
                if self._client is None:
                    await client.aclose()
        except httpx.TimeoutException:
            raise errors.RetryableError(f"The request to {url!r} timed out.") from None
        except httpx.TransportError as exc:
            raise errors.RetryableError(f"The request to {url!r} failed: {exc}.") from None
        if response.status_code == 429 or response.status_code >= 500:
            raise errors.RetryableError(
                f"The request to {url!r} answered {response.status_code}; it will be retried."
            )
        if response.status_code >= 400:
            raise errors.PermanentError(
                f"The request to {url!r} answered {response.status_code}: {response.text[:200]}"
            )
        result: dict[str, Any] = {
            "status": response.status_code,
            "headers": {"content-type": response.headers.get("content-type", "")},
            "text": response.text[: self._max_body],
        }
        if "json" in response.headers.get("content-type", ""):
            try:
                result["json"] = response.json()
            except ValueError:
                pass
        return Done(result)


# IPv6 ranges whose addresses carry an IPv4 address a gateway may forward to (RFC 4291
# mapped and compatible, RFC 6052/8215 NAT64, RFC 3056 6to4, RFC 4380 Teredo).
_EMBEDDING = [
    ipaddress.ip_network(n)
    for n in ("::ffff:0:0/96", "::/96", "64:ff9b::/96", "64:ff9b:1::/48", "2002::/16", "2001::/32")
]


def _embeds_ipv4(ip: ipaddress.IPv6Address) -> bool:
    return any(ip in net for net in _EMBEDDING)


def _pinned_transport(url: str, address: str | None) -> httpx.AsyncHTTPTransport | None:
    """A transport whose connections go to the vetted ``address`` whatever the URL's host
    resolves to now; TLS still verifies the certificate against the URL's host name."""
    if address is None:
        return None
    import httpcore
    import httpx

    wanted = (urlsplit(url).hostname or "").lower().strip("[]")
    vetted: str = address

    class Pinned(httpcore.AsyncNetworkBackend):
        def __init__(self, inner: httpcore.AsyncNetworkBackend) -> None:
            self._inner = inner

        async def connect_tcp(
            self,
            host: str,
            port: int,
            timeout: float | None = None,  # noqa: ASYNC109 (httpcore's signature)
            local_address: str | None = None,
            socket_options: Any = None,
        ) -> httpcore.AsyncNetworkStream:
            if host.lower().strip("[]") not in (wanted, vetted):
                raise errors.TargetRefusedError(f"A connection to {host!r} was not vetted.")
            return await self._inner.connect_tcp(
                vetted, port, timeout=timeout, local_address=local_address,
                socket_options=socket_options,
            )  # fmt: skip

        async def connect_unix_socket(self, *args: Any, **kwargs: Any) -> Any:
            raise errors.TargetRefusedError("Outbound requests may not use Unix sockets.")

        async def sleep(self, seconds: float) -> None:
            await self._inner.sleep(seconds)

    transport = httpx.AsyncHTTPTransport(trust_env=False)  # an env proxy would resolve again
    pool = transport._pool  # httpx builds its httpcore pool; only its backend is swapped
    pool._network_backend = Pinned(pool._network_backend)
    return transport


def _is_network(value: str) -> bool:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return False
    return True


def builtin(*, http_allow: Iterable[str] = (), resolver: Resolver | None = None) -> Registry:
    """A registry with the built-in cloud executors (the LLM ones say they need a provider)."""
    registry = Registry()
    for action in LLM_ACTIONS:
        registry.unavailable(action, NO_LLM.format(action=action))
    registry.register("noop", noop)
    registry.register("wait", wait)
    registry.register("notify", notify)
    http = HttpRequest(allow=http_allow, resolver=resolver or _system_resolve)
    registry.register("http.request", http)
    return registry
