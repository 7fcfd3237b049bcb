"""The ``cpa-scheduler`` command line: the local host of the same functions.

``serve`` runs the API and the long-running dispatcher in one process (embedded PostgreSQL
unless DATABASE_URL is set); ``token``, ``submit``, ``watch`` and ``agent`` are clients of it
(CPA_API_URL, CPA_TOKEN); ``dispatch``, ``migrate`` and ``route`` work on their own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cpa_scheduler import (
    catalogue,
    database,
    dispatch,
    errors,
    intents,
    planner,
    protocol,
    settings,
    store,
)
from cpa_scheduler import client as client_mod


def _migrate(args: argparse.Namespace) -> int:
    url = database.prepare(settings.from_env(), migrate=True)
    print(f"Migrations are applied to {url.split('@')[-1]}.")
    return 0


def _route(args: argparse.Namespace) -> int:
    routed = intents.default().route(args.text)
    out: dict[str, object] = {"intent": routed.intent, "groups": routed.groups}
    if routed.graph is not None:
        built = catalogue.default().build(routed.graph)
        out["plan"] = routed.graph.model_dump(exclude_none=True)["todos"]
        out["batches"] = built.batches()
    else:
        out["plan"] = None
        out["note"] = "No intent matched; the LLM planner would plan this request."
    print(json.dumps(out, ensure_ascii=False, indent=2))
    return 0


async def _dispatch_run(args: argparse.Namespace) -> dict[str, object]:
    config = settings.from_env()
    url = database.prepare(config, migrate=config.local)
    db = store.Store(url, timeout=config.db_timeout)
    dispatcher = dispatch.Dispatcher(
        db,
        registry=planner.registry_for(config, db),
        concurrency=args.concurrency,
        lease_seconds=args.lease,
        tenant_cap=config.tenant_cap,
        retention_days=config.retention_days,
        audit_retention_days=config.audit_retention_days,
    )
    try:
        if args.once:
            return (await dispatcher.run_pass(args.budget)).as_dict()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print("dispatcher: running; SIGTERM stops it after the ToDos it holds.", file=sys.stderr)
        max_down = config.dispatch_max_down or None
        worker = asyncio.create_task(dispatcher.run_forever(url, stop=stop, max_down=max_down))
        watchdog = asyncio.create_task(_watchdog(dispatcher.health, stop))
        await asyncio.wait({worker, watchdog}, return_when=asyncio.FIRST_COMPLETED)
        if not worker.done():  # the watchdog gave up on a stalled loop
            worker.cancel()
            watchdog.result()
        watchdog.cancel()
        return worker.result().as_dict()
    finally:
        await db.close()


async def _watchdog(health: dispatch.Health, stop: asyncio.Event) -> None:
    """Raise when the dispatcher loop has stopped making progress (a hang, not a fault: faults
    are retried by the loop itself), so the worker exits non-zero and is restarted."""
    import time

    while not stop.is_set():
        await asyncio.sleep(min(5.0, health.stale_after / 4))
        idle = time.monotonic() - health.last_beat
        if health.running and idle > health.stale_after:
            raise errors.UnavailableError(
                f"The dispatcher made no progress for {idle:.0f} s (limit "
                f"{health.stale_after:.0f} s); exiting so its supervisor restarts it."
            )


def _dispatch(args: argparse.Namespace) -> int:
    print(json.dumps(asyncio.run(_dispatch_run(args))))
    return 0


NAMESPACE = uuid.UUID("5f1c1e9e-6b1e-4c1a-9a55-3c0a7c3d7e00")
DESKTOP_ACTIONS = ["desktop.open_app", "file.write", "file.read", "notes.create"]


def _ident(value: str, kind: str) -> uuid.UUID:
    """A UUID as given, or a stable one derived from a name."""
    try:
        return uuid.UUID(value)
    except ValueError:
        return uuid.uuid5(NAMESPACE, f"{kind}:{value}")


def _serve(args: argparse.Namespace) -> int:
    from cpa_scheduler import auth, extra, ratelimit

    uvicorn = extra.require("uvicorn", "cpa-scheduler serve")
    from cpa_scheduler.api import state as api_state

    config = settings.from_env()
    url = database.prepare(config, migrate=True)
    db = store.Store(url, max_size=config.pool_max_size, timeout=config.db_timeout)
    dispatcher = dispatch.Dispatcher(
        db, registry=planner.registry_for(config, db), tenant_cap=config.tenant_cap,
        retention_days=config.retention_days, audit_retention_days=config.audit_retention_days,
    )  # fmt: skip
    api_state.set_state(
        api_state.State(
            config, db, auth.verifier(config), ratelimit.limiter(config, db), dispatcher.health
        )
    )

    async def main() -> None:
        from cpa_scheduler import api

        server = uvicorn.Server(
            uvicorn.Config(
                api.app, host=args.host, port=args.port, log_level="warning", lifespan="off"
            )
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        web = asyncio.create_task(server.serve())
        worker = asyncio.create_task(dispatcher.run_forever(url, stop=stop))
        mode = "embedded PostgreSQL in " + str(config.data_dir) if config.local else "DATABASE_URL"
        print(f"CPA Scheduler on http://{args.host}:{args.port} ({mode}).", file=sys.stderr)
        print("Get a token: export CPA_TOKEN=$(cpa-scheduler token --tenant demo --user me)",
              file=sys.stderr)  # fmt: skip
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({stopping, worker, web}, return_when=asyncio.FIRST_COMPLETED)
        failed = worker.done() and not stop.is_set()
        stop.set()
        server.should_exit = True
        await asyncio.gather(web, worker, return_exceptions=True)
        await db.close()
        if failed:  # the supervised loop only ends on stop; anything else is a bug: say so
            worker.result()
            raise errors.UnavailableError("The dispatcher stopped unexpectedly.")

    asyncio.run(main())
    return 0


def _token(args: argparse.Namespace) -> int:
    from cpa_scheduler import auth

    config = settings.from_env()
    if config.local:
        secret, issuer = auth.local_secret(config.data_dir), auth.LOCAL_ISSUER
    elif config.supabase_jwt_secret:
        secret, issuer = config.supabase_jwt_secret, config.issuer or auth.LOCAL_ISSUER
    else:
        raise errors.ConfigError(
            "token mints local tokens; with DATABASE_URL set it needs SUPABASE_JWT_SECRET."
        )
    tenant_id, user_id = _ident(args.tenant, "tenant"), _ident(args.user, "user")

    async def ensure() -> None:
        db = store.Store(database.prepare(config, migrate=True), max_size=1)
        try:
            async with db.admin() as session:
                await session.membership_ensure(
                    tenant_id, user_id, tenant_name=args.tenant, email=f"{user_id}@local.invalid"
                )
        finally:
            await db.close()

    asyncio.run(ensure())
    print(auth.mint(secret, user_id, issuer=issuer, tenant_id=tenant_id, ttl=args.ttl))
    return 0


def _client() -> client_mod.Client:
    token = os.environ.get("CPA_TOKEN", "").strip()
    if not token:
        raise errors.AuthError(
            "No token: export CPA_TOKEN=$(cpa-scheduler token --tenant demo --user me)."
        )
    return client_mod.Client(settings.from_env().api_url, token)


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
        async for event in c.events(job["id"]):
            if event["kind"] == "todo.status" and event["todo_id"] in todos:
                todos[event["todo_id"]]["status"] = event["status"]
            elif event["kind"] == "job.status":
                status = event["status"]
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


def _submit(args: argparse.Namespace) -> int:
    async def run() -> str:
        async with _client() as c:
            job = await c.submit(args.text)
            print(f"job {job['id']} ({job['intent']})", file=sys.stderr)
            return await _follow(c, job)

    return 0 if asyncio.run(run()) == "done" else 1


def _watch(args: argparse.Namespace) -> int:
    async def run() -> str:
        async with _client() as c:
            return await _follow(c, await c.get(args.job))

    return 0 if asyncio.run(run()) == "done" else 1


def _do(assign: protocol.Assign, sandbox: Path) -> Any:
    """The safe built-in subset a reference agent performs (files: see sandbox.Sandbox)."""
    from cpa_scheduler.sandbox import Sandbox

    p = assign.payload.params
    if assign.payload.action == "desktop.open_app":
        print(f"agent: open app {p['app']!r}", file=sys.stderr)
        return {"opened": p["app"]}
    if assign.payload.action in ("file.write", "file.read", "notes.create"):
        name = str(p.get("path") or f"notes/{assign.payload.todo_id}.md")
        box = Sandbox(sandbox)
        if assign.payload.action == "file.read":
            return {"text": box.read(name)}
        content = p.get("content", p.get("text", ""))
        text = content if isinstance(content, str) else json.dumps(content)
        return box.write(name, text.encode("utf-8", "backslashreplace"))
    raise errors.PermanentError(f"This agent cannot perform {assign.payload.action!r}.")


def _agent(args: argparse.Namespace) -> int:
    sandbox = Path(args.sandbox).expanduser()
    sandbox.mkdir(parents=True, exist_ok=True)

    async def run() -> int:
        handled = 0
        async with _client() as c:
            offer = protocol.make("offer", {"agent_id": args.agent_id, "name": "reference agent",
                                            "actions": DESKTOP_ACTIONS}, sender=args.agent_id, receiver="scheduler")  # fmt: skip
            await c.send(offer)
            while True:
                for assign in await c.claim(args.agent_id, DESKTOP_ACTIONS, limit=5):
                    await c.send(
                        protocol.reply_to(assign, "agree", {"todo_id": assign.payload.todo_id})
                    )
                    try:
                        result = _do(assign, sandbox)
                        reply = protocol.reply_to(
                            assign, "done", {"todo_id": assign.payload.todo_id, "result": result}
                        )
                    except (errors.CpaError, OSError) as exc:
                        # Never an OSError's text: it may hold the agent's absolute paths.
                        text = exc.message if isinstance(exc, errors.CpaError) else (
                            f"The action failed on this computer ({type(exc).__name__}, "
                            f"errno {exc.errno})."
                        )  # fmt: skip
                        reply = protocol.reply_to(
                            assign, "failure", {"todo_id": assign.payload.todo_id, "error": text}
                        )
                    answer = await c.send(reply)
                    handled += 1
                    print(
                        f"agent: {assign.payload.key} -> {reply.type} ({answer.type})",
                        file=sys.stderr,
                    )
                if args.once:
                    return handled
                await asyncio.sleep(args.poll)

    asyncio.run(run())
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cpa-scheduler", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sv = sub.add_parser("serve", help="run the API and the dispatcher (embedded DB by default)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.set_defaults(run=_serve)
    tk = sub.add_parser("token", help="print a local access token (creates tenant and membership)")
    tk.add_argument("--tenant", required=True, help="tenant name or UUID")
    tk.add_argument("--user", required=True, help="user name or UUID")
    tk.add_argument("--ttl", type=int, default=24 * 3600, help="seconds the token is valid")
    tk.set_defaults(run=_token)
    sb = sub.add_parser("submit", help="submit a request and show live progress until it ends")
    sb.add_argument("text")
    sb.set_defaults(run=_submit)
    wt = sub.add_parser("watch", help="follow a job's progress")
    wt.add_argument("job")
    wt.set_defaults(run=_watch)
    ag = sub.add_parser("agent", help="run a desktop agent worker (reference client)")
    ag.add_argument("--agent-id", default=f"agent-{socket.gethostname()}")
    ag.add_argument("--sandbox", default="~/cpa-agent-sandbox", help="the only folder files go to")
    ag.add_argument("--poll", type=float, default=1.0, help="seconds between claims")
    ag.add_argument("--once", action="store_true", help="claim once, handle it, exit")
    ag.set_defaults(run=_agent)
    sub.add_parser("migrate", help="apply the migrations").set_defaults(run=_migrate)
    r = sub.add_parser("route", help="show which intent and plan a text maps to")
    r.add_argument("text")
    r.set_defaults(run=_route)
    d = sub.add_parser(
        "dispatch", help="run the dispatcher (long-running, or one pass with --once)"
    )
    d.add_argument(
        "--once", action="store_true", help="run one pass, as the scheduled function does"
    )
    d.add_argument("--budget", type=float, default=50.0, help="seconds the pass may run")
    d.add_argument("--lease", type=float, default=60.0, help="lease seconds per claimed ToDo")
    d.add_argument("--concurrency", type=int, default=64, help="ToDos run at once")
    d.set_defaults(run=_dispatch)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except errors.CpaError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
