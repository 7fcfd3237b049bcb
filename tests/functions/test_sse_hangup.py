"""A client hanging up is quiet: at most one debug line per closed SSE stream, and the server
stops that stream's work at once (issue 22, item 5). Against a real `serve` process and its log."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from cpa_scheduler import auth, dispatch, store

from tests.conftest import MemberFactory, Server
from tests.functions.conftest import ISSUER, SECRET, bearer, free_port

STREAMS = 20
# A job whose events come in a burst a second after the hang-ups (60 ToDos after a short
# wait), and that then runs for minutes: its streams would have much to write, and more to wait
# for, long after their clients left.
GRAPH = {"todos": [{"key": "pause", "action": "wait", "params": {"seconds": 1}},
                   *({"key": f"n{i}", "action": "noop", "depends_on": ["pause"]}
                     for i in range(60)),
                   {"key": "sleep", "action": "wait", "params": {"seconds": 600},
                    "depends_on": ["pause"]}]}  # fmt: skip


@pytest.fixture
def served(pg_server: Server, template_db: str, tmp_path: Path) -> Iterator[dict[str, object]]:
    name = f"cpa_sse_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_server.admin("postgres"), autocommit=True) as conn:
        conn.execute(
            f'create database "{name}" template "{template_db}" owner "{pg_server.app_user}"'
        )
    url = pg_server.url(name)
    tenant, user = uuid.uuid4(), uuid.uuid4()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("insert into auth.users (id) values (%s)", (user,))
        conn.execute("insert into public.tenants (id, name) values (%s, 'sse')", (tenant,))
        conn.execute(
            "insert into public.memberships (tenant_id, user_id) values (%s, %s)", (tenant, user)
        )
    port = free_port()
    log = tmp_path / "serve.log"
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "SUPABASE_JWT_SECRET": SECRET,
        "SUPABASE_URL": ISSUER.removesuffix("/auth/v1"),
        "CPA_LOG_LEVEL": "INFO",
    }
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cpa_scheduler.cli", "serve", "--port", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield {"base": base, "token": auth.mint(SECRET, user, issuer=ISSUER), "log": log}
    finally:
        proc.terminate()
        proc.wait(30)
        with psycopg.connect(pg_server.admin("postgres"), autocommit=True) as conn:
            conn.execute(f'drop database if exists "{name}" with (force)')


async def test_twenty_streams_closed_after_one_event_keep_the_log_short(
    served: dict[str, object],
) -> None:
    base, log = str(served["base"]), served["log"]
    assert isinstance(log, Path)
    headers = {"Authorization": f"Bearer {served['token']}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=20) as c:
        job = (await c.post("/v1/jobs", json={"graph": GRAPH})).json()
        before = len(log.read_text().splitlines())

        async def one() -> None:
            async with c.stream("GET", f"/v1/jobs/{job['id']}/events") as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data:"):
                        return  # hang up after the first event

        await asyncio.gather(*(one() for _ in range(STREAMS)))
        # Time for every stream to notice, and for a noisy one to fill the log.
        await asyncio.sleep(3)
        assert (await c.get("/healthz")).status_code == 200
    lines = log.read_text().splitlines()[before:]
    assert len(lines) < 40, "\n".join(lines[:60])
    assert not [line for line in lines if '"level": "warning"' in line], lines


async def test_a_hang_up_is_one_debug_line_and_stops_the_stream(
    live_api: str,
    db: store.Store,
    member_factory: MemberFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    m = await member_factory()
    async with httpx.AsyncClient(base_url=live_api, headers=bearer(m), timeout=20) as c:
        job = (await c.post("/v1/jobs", json={"graph": GRAPH})).json()
        with caplog.at_level(logging.DEBUG):

            async def one() -> None:
                async with c.stream("GET", f"/v1/jobs/{job['id']}/events") as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data:"):
                            return

            await asyncio.gather(*(one() for _ in range(STREAMS)))
            runner = asyncio.create_task(dispatch.Dispatcher(db).run_pass(3))
            await asyncio.sleep(2)
            await runner
    left = [r for r in caplog.records if "the client left" in r.getMessage()]
    assert 1 <= len(left) <= STREAMS and all(r.levelno == logging.DEBUG for r in left)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], [
        r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
    ]
