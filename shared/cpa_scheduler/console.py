"""The command line's client commands: ``submit``, ``watch``, ``list``, ``cancel``, ``retry``,
``schedule`` and ``agent``, clients of a running server (CPA_API_URL, CPA_TOKEN; see
:mod:`cpa_scheduler.cli`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from cpa_scheduler import client as client_mod
from cpa_scheduler import (
    errors,
    settings,
    times,
)


def _client() -> client_mod.Client:
    # Client settings only: a client command needs none of the server's variables.
    config = settings.client_from_env()
    if not config.token:
        raise errors.AuthError(
            "No token: export CPA_TOKEN=$(cpa-scheduler token --tenant demo --user me)."
        )
    realtime = provider = None
    # Progress over Supabase Realtime when the project and its publishable key are known;
    # SSE from the API otherwise (local mode).
    if config.realtime is not None:
        url, key = config.realtime
        realtime = client_mod.RealtimeConfig(url, key)
        if config.refresh_token:
            provider = client_mod.supabase_refresher(url, key, config.refresh_token)
    return client_mod.Client(
        config.api_url, config.token, realtime=realtime, token_provider=provider
    )


async def _follow(c: client_mod.Client, job: dict[str, Any]) -> str:
    """Live progress: a line per ToDo and a bar for the job; returns the final status."""
    from cpa_scheduler import extra

    extra.require("rich", "Live progress in the terminal")
    from rich.console import Console, Group
    from rich.live import Live
    from rich.progress import BarColumn, Progress, TextColumn
    from rich.table import Table

    todos = {
        t["id"]: {"key": t["key"], "action": t["action"], "status": t["status"]}
        for t in job["todos"]
    }
    status = job["status"]
    bar = Progress(
        TextColumn("job {task.fields[status]}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
    )
    task = bar.add_task("job", total=len(todos), status=status)

    def render() -> Group:
        table = Table(show_header=True, box=None)
        for col in ("ToDo", "action", "status"):
            table.add_column(col)
        for t in todos.values():
            table.add_row(t["key"], t["action"], t["status"])
        done = sum(1 for t in todos.values() if t["status"] == "done")
        bar.update(task, completed=done, status=status)
        return Group(table, bar)

    console = Console()
    with Live(render(), console=console, refresh_per_second=8, transient=False) as live:
        async for event in c.events(job["id"], tenant_id=job.get("tenant_id")):
            if event["kind"] == "todo.status" and event["todo_id"] in todos:
                todos[event["todo_id"]]["status"] = event["status"]
            elif event["kind"] == "job.status":
                status = event["status"]
            elif event["kind"] == "todo.waiting_for_agent":
                console.print(f"[yellow]{event['data'].get('key', '')}: "
                              f"{event['data'].get('message', 'waiting for an agent')}[/]")  # fmt: skip
            elif event["kind"] == "notification":
                console.print(
                    f"[bold]{event['data'].get('title', '')}[/]: {event['data'].get('message', '')}"
                )
            live.update(render())
    console.print()
    final = await c.get(job["id"])
    if final["error"]:
        console.print(f"[red]{final['error']}[/]")
    console.print(f"job {final['id']} {final['status']}")
    return str(final["status"])


def _local_zone() -> str:
    """The machine's IANA zone: TZ, else the /etc/localtime link, else UTC."""
    tz = settings.client_from_env().time_zone
    if tz:
        return tz
    try:
        link = os.readlink("/etc/localtime")
    except OSError:
        return "UTC"
    return link.split("zoneinfo/", 1)[1] if "zoneinfo/" in link else "UTC"


def _run_at(value: str | None, time_zone: str) -> str | None:
    """``--run-at`` as RFC 3339 with an offset: given so, or said in words ("tomorrow at 9",
    "morgen um 9") and read in ``time_zone``; else an error that says how to write it."""
    if value is None:
        return None
    from datetime import datetime

    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        when = None
    if when is not None and when.tzinfo is not None:
        return when.isoformat()
    try:
        return times.resolve(value, tz=times.zone(time_zone)).isoformat(timespec="seconds")
    except errors.InvalidError:
        raise errors.InvalidError(
            f"--run-at {value!r} is not a time: give RFC 3339 with an offset "
            "(2026-12-01T08:00:00+01:00) or a time in words with a clock time "
            "('tomorrow at 9am', 'morgen um 9')."
        ) from None


def _submit(args: argparse.Namespace) -> int:
    run_at = _run_at(args.run_at, args.time_zone)
    if run_at is not None and run_at != args.run_at:
        print(f"--run-at {args.run_at!r} is {run_at}", file=sys.stderr)

    async def run() -> str:
        async with _client() as c:
            job = await c.submit(args.text, time_zone=args.time_zone, run_at=run_at)
            if args.detach:
                print(job["id"])
                return "done"
            print(f"job {job['id']} ({job['intent']})", file=sys.stderr)
            for todo in job["todos"]:
                if todo.get("run_at"):
                    print(f"{todo['key']}: runs at {todo['run_at']}", file=sys.stderr)
            return await _follow(c, job)

    return 0 if asyncio.run(run()) == "done" else 1


def _list(args: argparse.Namespace) -> int:
    async def run() -> list[dict[str, Any]]:
        async with _client() as c:
            page = await c.jobs(status=args.status, limit=args.limit)
            return list(page["jobs"])

    jobs = asyncio.run(run())
    if args.json:
        print(json.dumps(jobs, ensure_ascii=False, indent=2))
        return 0
    for job in jobs:
        when = f" run_at={job['run_at']}" if job.get("run_at") else ""
        print(f"{job['id']}  {job['status']:<9}  {job['created_at'][:19]}  "
              f"{job['intent'] or '-':<14} {job['request'] or ''}{when}")  # fmt: skip
    if not jobs:
        print("No jobs.", file=sys.stderr)
    return 0


def _job_action(args: argparse.Namespace) -> int:
    async def run() -> dict[str, Any]:
        async with _client() as c:
            if args.command == "cancel":
                return await c.cancel(args.job)
            return await c.retry(args.job)

    job = asyncio.run(run())
    print(f"job {job['id']} {job['status']}")
    return 0


def _schedule_line(row: dict[str, Any]) -> str:
    state = "paused" if row["paused"] else f"next {row['next_run_at']}"
    what = row["request"] if row.get("request") else "(graph)"
    return f"{row['id']}  {row['cron']:<15} {row['time_zone']:<16} {state}  {what}"


def _schedule(args: argparse.Namespace) -> int:
    # Checked here first: '@daily' gets a message that says why, before any token or server.
    cron = times.validate_cron(args.cron) if args.action == "add" else ""

    async def run() -> int:
        async with _client() as c:
            if args.action == "add":
                print(_schedule_line(await c.schedule_add(
                    cron, time_zone=args.time_zone, request=args.text)))  # fmt: skip
            elif args.action == "list":
                rows = await c.schedules()
                for row in rows:
                    print(_schedule_line(row))
                if not rows:
                    print("No schedules.", file=sys.stderr)
            elif args.action in ("pause", "resume"):
                row = await c.schedule_pause(args.schedule, paused=args.action == "pause")
                print(_schedule_line(row))
            else:
                await c.schedule_delete(args.schedule)
                print(f"schedule {args.schedule} deleted")
        return 0

    return asyncio.run(run())


def _watch(args: argparse.Namespace) -> int:
    async def run() -> str:
        async with _client() as c:
            return await _follow(c, await c.get(args.job))

    return 0 if asyncio.run(run()) == "done" else 1


def _agent(args: argparse.Namespace) -> int:
    from cpa_scheduler import desktop

    sandbox = Path(args.sandbox).expanduser()
    sandbox.mkdir(parents=True, exist_ok=True)

    async def run() -> int:
        async with _client() as c:
            return await desktop.serve(c, args.agent_id, sandbox, once=args.once, wait=args.wait)

    asyncio.run(run())
    return 0
