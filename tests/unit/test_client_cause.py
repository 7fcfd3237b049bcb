"""The reason the client gives when it follows over the API instead of Realtime."""

from __future__ import annotations

from cpa_scheduler import client


def test_a_fallback_names_its_cause_even_when_the_exception_has_no_text() -> None:
    assert client._cause(TimeoutError(), 10.0) == "no answer within 10 s"
    assert client._cause(ConnectionRefusedError(111, "Connect call failed"), 10.0) == (
        "[Errno 111] Connect call failed"
    )
    assert client._cause(RuntimeError(), 10.0) == "RuntimeError"
