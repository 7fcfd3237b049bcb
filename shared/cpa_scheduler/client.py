"""A Python client of the CPA Scheduler API, for CPA Desktop AI and the CLI.

Submit and follow jobs (SSE that resumes with ``Last-Event-ID`` after a dropped connection),
and act as a desktop agent (claim assignments, reply with protocol messages).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx

from cpa_scheduler import errors, protocol

TERMINAL = {"done", "failed", "cancelled"}
_BY_STATUS: dict[int, type[errors.CpaError]] = {
    401: errors.AuthError,
    404: errors.NotFoundError,
    409: errors.ConflictError,
    413: errors.InvalidError,
    422: errors.InvalidError,
    503: errors.UnavailableError,
}


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        body = response.json()
        detail = body.get("detail") or response.text
        field_errors = body.get("errors")
    except ValueError:
        detail, field_errors = response.text or response.reason_phrase, None
    if response.status_code == 429:
        wait = float(response.headers.get("Retry-After", "1"))
        raise errors.RateLimitedError(str(detail), retry_after=wait)
    cls = _BY_STATUS.get(response.status_code, errors.CpaError)
    raise cls(str(detail), errors=field_errors if isinstance(field_errors, list) else None)


class Client:
    """Async client; use as ``async with Client(url, token) as c``."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(timeout, read=None),
            transport=transport,
        )

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, **kw: Any) -> Any:
        try:
            response = await self._http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise errors.UnavailableError(
                f"The scheduler at {self._http.base_url} is unreachable ({exc}); is it running? "
                "Start it with 'make run' or set CPA_API_URL."
            ) from None
        _raise_for(response)
        return response.json() if response.content else None

    # jobs ---------------------------------------------------------------------------------

    async def submit(
        self,
        text: str | None = None,
        *,
        graph: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        time_zone: str | None = None,
        run_at: str | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"request": text} if graph is None else {"graph": graph}
        if time_zone:
            body["time_zone"] = time_zone
        if run_at:
            body["run_at"] = run_at
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        result: dict[str, Any] = await self._call("POST", "/v1/jobs", json=body, headers=headers)
        return result

    async def get(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("GET", f"/v1/jobs/{job_id}")
        return result

    async def jobs(
        self, *, status: str | None = None, limit: int = 50, cursor: str | None = None
    ) -> dict[str, Any]:
        """One page of the tenant's jobs, newest first: ``{"jobs", "next_cursor"}``."""
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        if cursor:
            params["cursor"] = cursor
        result: dict[str, Any] = await self._call("GET", "/v1/jobs", params=params)
        return result

    # schedules ----------------------------------------------------------------------------

    async def schedule_add(
        self, cron: str, *, time_zone: str = "UTC", request: str | None = None,
        graph: dict[str, Any] | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        body: dict[str, Any] = {"cron": cron, "time_zone": time_zone}
        body |= {"request": request} if graph is None else {"graph": graph}
        result: dict[str, Any] = await self._call("POST", "/v1/schedules", json=body)
        return result

    async def schedules(self) -> list[dict[str, Any]]:
        result: dict[str, Any] = await self._call("GET", "/v1/schedules")
        return list(result["schedules"])

    async def schedule_pause(self, schedule_id: str, *, paused: bool = True) -> dict[str, Any]:
        verb = "pause" if paused else "resume"
        result: dict[str, Any] = await self._call("POST", f"/v1/schedules/{schedule_id}/{verb}")
        return result

    async def schedule_delete(self, schedule_id: str) -> None:
        await self._call("DELETE", f"/v1/schedules/{schedule_id}")

    async def cancel(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("POST", f"/v1/jobs/{job_id}/cancel")
        return result

    async def retry(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("POST", f"/v1/jobs/{job_id}/retry")
        return result

    async def events(
        self, job_id: str, *, last_event_id: int | None = None, reconnects: int = 20
    ) -> AsyncIterator[dict[str, Any]]:
        """Progress events until the job ends; reconnects with Last-Event-ID when dropped."""
        last = last_event_id
        attempts = 0
        while True:
            headers = {"Last-Event-ID": str(last)} if last is not None else {}
            try:
                async with self._http.stream(
                    "GET", f"/v1/jobs/{job_id}/events", headers=headers
                ) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        _raise_for(response)
                    attempts = 0
                    async for event in _parse_sse(response.aiter_lines()):
                        last = int(event["id"])
                        yield event
                        if event["kind"] == "job.status" and event["status"] in TERMINAL:
                            return
                # The server closes the stream only after the terminal event, or when the job
                # had already ended before we (re)connected.
                return
            except (httpx.TransportError, httpx.RemoteProtocolError):
                attempts += 1
                if attempts > reconnects:
                    raise errors.UnavailableError(
                        f"The event stream of job {job_id} dropped {attempts} times in a row."
                    ) from None
                await asyncio.sleep(min(5.0, 0.2 * 2**attempts))

    # agents -------------------------------------------------------------------------------

    async def claim(
        self, agent_id: str, actions: Sequence[str] | None = None, limit: int = 10
    ) -> list[protocol.Assign]:
        body = {"agent_id": agent_id, "actions": list(actions) if actions else None, "limit": limit}
        rows = await self._call("POST", "/v1/agents/claim", json=body)
        out = []
        for row in rows:
            msg = protocol.parse(row)
            assert isinstance(msg, protocol.Assign)
            out.append(msg)
        return out

    async def send(self, message: protocol.Message) -> protocol.Message:
        """Send any protocol message; returns the scheduler's answer."""
        return protocol.parse(await self._call("POST", "/v1/messages", json=protocol.dump(message)))


async def _parse_sse(lines: AsyncIterator[str]) -> AsyncIterator[dict[str, Any]]:
    data: list[str] = []
    async for line in lines:
        if line.startswith("data:"):
            data.append(line[5:].lstrip())
        elif line == "" and data:
            yield json.loads("\n".join(data))
            data = []
