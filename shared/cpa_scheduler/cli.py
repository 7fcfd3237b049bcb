"""The ``cpa-scheduler`` command line: the local host of the same functions.

``serve`` runs the API and the long-running dispatcher in one process (embedded PostgreSQL
unless DATABASE_URL is set); ``token``, ``submit``, ``watch`` and ``agent`` are clients of it
(CPA_API_URL, CPA_TOKEN), as are ``list``, ``cancel``, ``retry`` and ``schedule``;
``dispatch``, ``migrate`` and ``route`` work on their own. ``serve`` and ``dispatch`` are hosts:
they compose :func:`cpa_scheduler.service.build_services`, the app and the dispatcher.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

from cpa_scheduler import (
    catalogue,
    database,
    dispatch,
    errors,
    graph,
    intents,
    logs,
    service,
    settings,
    store,
    times,
    tracing,
)
from cpa_scheduler import client as client_mod

HELP = """\
CPA Scheduler: jobs as ToDo graphs for CPA Desktop AI.

serve runs the API and the dispatcher in one process (embedded PostgreSQL unless
DATABASE_URL is set). token, submit, watch, agent, list, cancel, retry and schedule are
clients of it; dispatch, migrate and route work on their own."""


def _migrate(args: argparse.Namespace) -> int:
    with database.prepared(settings.from_env(), migrate=True) as url:
        print(f"Migrations are applied to {url.split('@')[-1]}.")
    return 0


def _route(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from cpa_scheduler import intake, times

    tz = times.zone(args.time_zone)
    routed = intents.default().route(args.text, resolve_time=intake.resolver(tz, datetime.now(UTC)))
    out: dict[str, object] = {"intent": routed.intent, "groups": routed.groups}
    if routed.graph is not None:
        built = catalogue.default().build(routed.graph)
        out["plan"] = routed.graph.model_dump(mode="json", exclude_none=True)["todos"]
        out["batches"] = built.batches()
    else:
        out["plan"] = None
        out["note"] = "No intent matched; the LLM planner would plan this request."
    print(json.dumps(out, ensure_ascii=False, indent=2))
    return 0


async def _dispatch_run(args: argparse.Namespace, services: service.Services) -> dict[str, object]:
    config, url = services.config, services.store.url
    dispatcher = services.dispatcher(concurrency=args.concurrency, lease_seconds=args.lease)
    try:
        if args.once:
            return (await dispatcher.run_pass(args.budget)).as_dict()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        web = None
        if args.metrics_port:
            from cpa_scheduler import extra
            from cpa_scheduler.api import observe

            uvicorn = extra.require("uvicorn", "The dispatcher's /metrics (--metrics-port)")

            web = uvicorn.Server(
                uvicorn.Config(observe.worker_app(services), host=args.metrics_host,
                               port=args.metrics_port, log_config=None, lifespan="off",
                               access_log=False)
            )  # fmt: skip
            serving = asyncio.create_task(web.serve())
            print(f"dispatcher: metrics on http://{args.metrics_host}:{args.metrics_port}/metrics",
                  file=sys.stderr)  # fmt: skip
        print("dispatcher: running; SIGTERM stops it after the ToDos it holds.", file=sys.stderr)
        try:
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
            if web is not None:
                web.should_exit = True
                await serving
    finally:
        await services.close()
        tracing.shutdown()


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
    config = settings.from_env()
    logs.setup(config)
    tracing.setup("cpa-scheduler-dispatcher")
    with database.prepared(config, migrate=config.local) as url:
        services = service.build_services(config, url=url)
        print(json.dumps(asyncio.run(_dispatch_run(args, services))))
    return 0


NAMESPACE = uuid.UUID("5f1c1e9e-6b1e-4c1a-9a55-3c0a7c3d7e00")


def _ident(value: str, kind: str) -> uuid.UUID:
    """A UUID as given, or a stable one derived from a name."""
    try:
        return uuid.UUID(value)
    except ValueError:
        return uuid.uuid5(NAMESPACE, f"{kind}:{value}")


def _listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound before anything starts: a busy port is one line, not a
    banner and a traceback."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        raise errors.UnavailableError(
            f"cpa-scheduler serve cannot listen on {host}:{port} ({why}): another server, "
            "perhaps another serve, has it. Stop that one or choose another --port."
        ) from None
    return sock


def _serve(args: argparse.Namespace) -> int:
    config = settings.from_env()
    sock = _listen(args.host, args.port)
    # The embedded PostgreSQL this starts is stopped when serve ends (see database.prepared).
    with sock, database.prepared(config, migrate=True) as url:
        _serve_on(args, config, url, sock)
    return 0


def _serve_on(
    args: argparse.Namespace, config: settings.Settings, url: str, sock: socket.socket
) -> None:
    from cpa_scheduler import extra

    uvicorn = extra.require("uvicorn", "cpa-scheduler serve")

    logs.setup(config)
    tracing.setup("cpa-scheduler")
    services = service.build_services(config, url=url)
    dispatcher = services.dispatcher()

    async def main() -> None:
        from cpa_scheduler import api  # FastAPI: only the commands that serve HTTP import it
        from cpa_scheduler.api import problems

        app = api.create_app(services, dispatcher=dispatcher.health)
        # h11 would refuse a request head over 16 KiB with a text/plain 400 or a reset; let
        # it buffer more, so the API's own limit answers (431 problem+json).
        server = uvicorn.Server(
            uvicorn.Config(app, host=args.host, port=args.port, log_config=None, lifespan="off",
                           h11_max_incomplete_event_size=problems.H11_MAX_HEAD)
        )  # fmt: skip
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        web = asyncio.create_task(server.serve(sockets=[sock]))
        worker = asyncio.create_task(dispatcher.run_forever(url, stop=stop))
        mode = "embedded PostgreSQL in " + str(config.data_dir) if config.local else "DATABASE_URL"
        print(f"CPA Scheduler on http://{args.host}:{args.port} ({mode}).", file=sys.stderr)
        print("Get a token: export CPA_TOKEN=$(cpa-scheduler token --tenant demo --user me)",
              file=sys.stderr)  # fmt: skip
        print(f"Jobs page: http://{args.host}:{args.port}/ui/ (signed in: cpa-scheduler ui --open)",
              file=sys.stderr)  # fmt: skip
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({stopping, worker, web}, return_when=asyncio.FIRST_COMPLETED)
        failed = worker.done() and not stop.is_set()
        stop.set()
        services.stopping()  # open long-polls answer now, so the server can exit
        server.should_exit = True
        await asyncio.gather(web, worker, return_exceptions=True)
        await services.close()
        tracing.shutdown()
        if failed:  # the supervised loop only ends on stop; anything else is a bug: say so
            worker.result()
            raise errors.UnavailableError("The dispatcher stopped unexpectedly.")

    asyncio.run(main())


def _token(args: argparse.Namespace) -> int:
    print(_mint(args.tenant, args.user, args.ttl, args.role))
    return 0


def _ui(args: argparse.Namespace) -> int:
    """The jobs page's address, signed in: the token rides in the fragment, which the browser
    never sends to the server; the page moves it to session storage and drops it."""
    base = settings.client_from_env().api_url.rstrip("/")
    url = f"{base}/ui/#access_token={_mint(args.tenant, args.user, args.ttl)}"
    print(url)
    if args.open:
        import webbrowser

        if not webbrowser.open(url):
            print("No browser could be started here; open the address above.", file=sys.stderr)
    return 0


def _mint(tenant: str, user: str, ttl: int, role: str | None = None) -> str:
    """A local access token for ``user`` in ``tenant``; creates both and the membership."""
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
    tenant_id, user_id = _ident(tenant, "tenant"), _ident(user, "user")

    async def ensure(url: str) -> None:
        db = store.Store(url, max_size=1)
        try:
            async with db.admin() as session:
                # The tenant's first user owns it; later ones are members (who see only their
                # own jobs) unless --role says otherwise. An existing membership keeps its role.
                chosen = role or (
                    "member" if await session.tenant_other_members(tenant_id, user_id) else "owner"
                )
                await session.membership_ensure(
                    tenant_id, user_id, tenant_name=tenant, email=f"{user_id}@local.invalid",
                    role=chosen,
                )  # fmt: skip
        finally:
            await db.close()

    with database.prepared(config, migrate=True) as url:
        asyncio.run(ensure(url))
    return auth.mint(secret, user_id, issuer=issuer, tenant_id=tenant_id, ttl=ttl)


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


def parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(
        prog="cpa-scheduler",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Clients find the server by CPA_API_URL (default http://127.0.0.1:8000) and "
        "the token by CPA_TOKEN.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text, formatter_class=fmt)

    sv = cmd("serve", "Run the API and the dispatcher (embedded PostgreSQL unless DATABASE_URL).")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on")
    sv.add_argument("--port", type=int, default=8000, help="port to listen on")
    sv.set_defaults(run=_serve)
    tk = cmd("token", "Print a local access token; creates the tenant and membership if missing.")
    tk.add_argument("--tenant", required=True, help="tenant name or UUID")
    tk.add_argument("--user", required=True, help="user name or UUID")
    tk.add_argument("--ttl", type=int, default=24 * 3600, help="seconds the token is valid")
    tk.add_argument("--role", choices=["owner", "admin", "member"],
                    help="a new membership's role (default: owner for the tenant's first user, "
                    "member after; members see only their own jobs)")  # fmt: skip
    tk.set_defaults(run=_token)
    ui = cmd("ui", "Print the jobs page's address, signed in (local mode); --open opens it.")
    ui.add_argument("--tenant", default="demo", help="tenant name or UUID")
    ui.add_argument("--user", default="me", help="user name or UUID")
    ui.add_argument("--ttl", type=int, default=8 * 3600, help="seconds the sign-in is valid")
    ui.add_argument("--open", action="store_true", help="open it in the default browser")
    ui.set_defaults(run=_ui)
    sb = cmd("submit", "Submit a request and show live progress until the job ends "
                       "(exit 0 when done).")  # fmt: skip
    sb.add_argument("text", help="the request, e.g. 'Erinnere mich in 10 Minuten an den Tee'")
    sb.add_argument("--time-zone", default=_local_zone(),
                    help="IANA zone times in TEXT are read in (TZ or the system zone)")  # fmt: skip
    sb.add_argument("--run-at", default=None,
                    help="earliest start, RFC 3339 with offset, e.g. 2026-12-01T08:00:00+01:00")  # fmt: skip
    sb.add_argument("--detach", action="store_true",
                    help="print only the job id and return at once (follow later with watch)")  # fmt: skip
    sb.set_defaults(run=_submit)
    wt = cmd("watch", "Follow a job's progress until it ends.")
    wt.add_argument("job", help="the job id")
    wt.set_defaults(run=_watch)
    ls = cmd("list", "List the tenant's jobs, newest first.")
    ls.add_argument("--status", choices=get_args(graph.JobStatus),
                    help="only jobs with this status")  # fmt: skip
    ls.add_argument("--limit", type=int, default=50, help="at most this many jobs (1-200)")
    ls.add_argument("--json", action="store_true", help="print the jobs as JSON")
    ls.set_defaults(run=_list)
    cn = cmd("cancel", "Cancel a pending or running job; running ToDos finish, nothing new starts.")
    cn.add_argument("job", help="the job id")
    cn.set_defaults(run=_job_action)
    rt = cmd("retry", "Retry a failed or cancelled job from where it stopped.")
    rt.add_argument("job", help="the job id")
    rt.set_defaults(run=_job_action)
    sc = cmd("schedule", "Manage recurring schedules (cron in a time zone).")
    scs = sc.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = scs.add_parser("add", formatter_class=fmt, help="create a schedule",
                         description="Create a schedule: each occurrence of CRON runs TEXT as a job.")  # fmt: skip
    add.add_argument("cron", help="5 fields: minute hour day month weekday, e.g. '0 8 * * 1'")
    add.add_argument("text", help="the request each run submits, e.g. 'Check my email'")
    add.add_argument("--time-zone", default=_local_zone(), help="IANA zone CRON is read in")
    scs.add_parser("list", formatter_class=fmt, help="list the tenant's schedules",
                   description="List the tenant's schedules.")  # fmt: skip
    for verb, text in (("pause", "pause a schedule (no runs until resumed)"),
                       ("resume", "resume a schedule from its next occurrence"),
                       ("delete", "delete a schedule (its jobs stay)")):  # fmt: skip
        one = scs.add_parser(
            verb, formatter_class=fmt, help=text, description=text.capitalize() + "."
        )
        one.add_argument("schedule", help="the schedule id")
    sc.set_defaults(run=_schedule)
    ag = cmd("agent", "Run a desktop agent worker (the reference client).")
    ag.add_argument("--agent-id", default=f"agent-{socket.gethostname()}", help="this agent's id")
    ag.add_argument("--sandbox", default="~/cpa-agent-sandbox", help="the only folder files go to")
    ag.add_argument(
        "--wait",
        type=float,
        default=20.0,
        help="seconds one claim long-polls for work (without Realtime; at most 20)",
    )
    ag.add_argument("--poll", type=float, help=argparse.SUPPRESS)  # replaced by push and --wait
    ag.add_argument("--once", action="store_true", help="claim once, handle it, exit")
    ag.set_defaults(run=_agent)
    cmd("migrate", "Apply the database migrations.").set_defaults(run=_migrate)
    r = cmd("route", "Show which intent and plan a text maps to (no server needed).")
    r.add_argument("text", help="the request text")
    r.add_argument("--time-zone", default="UTC", help="IANA zone times in TEXT are read in")
    r.set_defaults(run=_route)
    d = cmd("dispatch", "Run the dispatcher (long-running, or one pass with --once).")
    d.add_argument(
        "--once", action="store_true", help="run one pass, as the scheduled function does"
    )
    d.add_argument("--budget", type=float, default=50.0, help="seconds the pass may run")
    d.add_argument("--lease", type=float, default=60.0, help="lease seconds per claimed ToDo")
    d.add_argument("--concurrency", type=int, default=64, help="ToDos run at once")
    d.add_argument("--metrics-host", default="127.0.0.1", help="where /metrics listens")
    d.add_argument(
        "--metrics-port", type=int, default=9464,
        help="port of /metrics of the long-running worker (0: none)",
    )  # fmt: skip
    d.set_defaults(run=_dispatch)
    return p


def _terminated(signum: int, frame: object) -> None:
    # SIGTERM unwinds like Ctrl-C, so that context managers (the embedded PostgreSQL's
    # session) clean up; serve's event loop handles both signals itself while it runs.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        code: int = args.run(args)
    except errors.CpaError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader (e.g. head) went away: stop quietly, and keep the exit-time flush quiet too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return code


if __name__ == "__main__":
    sys.exit(main())
