"""The ``cpa-scheduler`` command line: the local host of the same functions.

``serve`` runs the API and the long-running dispatcher in one process (embedded PostgreSQL
unless DATABASE_URL is set); ``token``, ``submit``, ``watch`` and ``agent`` are clients of it
(CPA_API_URL, CPA_TOKEN), as are ``list``, ``cancel``, ``retry`` and ``schedule``;
``dispatch``, ``migrate`` and ``route`` work on their own. ``serve`` and ``dispatch`` are hosts:
they compose :func:`cpa_scheduler.service.build_services`, the app and the dispatcher.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from typing import get_args

from cpa_scheduler import (
    console,
    errors,
    graph,
    host,
)

HELP = """\
CPA Scheduler: jobs as ToDo graphs for CPA Desktop AI.

serve runs the API and the dispatcher in one process (embedded PostgreSQL unless
DATABASE_URL is set). token, submit, watch, agent, list, cancel, retry and schedule are
clients of it; dispatch, migrate and route work on their own."""


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
    sv.set_defaults(run=host._serve)
    tk = cmd("token", "Print a local access token; creates the tenant and membership if missing.")
    tk.add_argument("--tenant", required=True, help="tenant name or UUID")
    tk.add_argument("--user", required=True, help="user name or UUID")
    tk.add_argument("--ttl", type=int, default=24 * 3600, help="seconds the token is valid")
    tk.add_argument("--role", choices=["owner", "admin", "member"],
                    help="a new membership's role (default: owner for the tenant's first user, "
                    "member after; members see only their own jobs)")  # fmt: skip
    tk.set_defaults(run=host._token)
    ui = cmd("ui", "Print the jobs page's address, signed in (local mode); --open opens it.")
    ui.add_argument("--tenant", default="demo", help="tenant name or UUID")
    ui.add_argument("--user", default="me", help="user name or UUID")
    ui.add_argument("--ttl", type=int, default=8 * 3600, help="seconds the sign-in is valid")
    ui.add_argument("--open", action="store_true", help="open it in the default browser")
    ui.set_defaults(run=host._ui)
    sb = cmd("submit", "Submit a request and show live progress until the job ends "
                       "(exit 0 when done).")  # fmt: skip
    sb.add_argument("text", help="the request, e.g. 'Erinnere mich in 10 Minuten an den Tee'")
    sb.add_argument("--time-zone", default=console._local_zone(),
                    help="IANA zone times in TEXT are read in (TZ or the system zone)")  # fmt: skip
    sb.add_argument("--run-at", default=None,
                    help="earliest start, RFC 3339 with offset, e.g. 2026-12-01T08:00:00+01:00")  # fmt: skip
    sb.add_argument("--detach", action="store_true",
                    help="print only the job id and return at once (follow later with watch)")  # fmt: skip
    sb.set_defaults(run=console._submit)
    wt = cmd("watch", "Follow a job's progress until it ends.")
    wt.add_argument("job", help="the job id")
    wt.set_defaults(run=console._watch)
    ls = cmd("list", "List the tenant's jobs, newest first.")
    ls.add_argument("--status", choices=get_args(graph.JobStatus),
                    help="only jobs with this status")  # fmt: skip
    ls.add_argument("--limit", type=int, default=50, help="at most this many jobs (1-200)")
    ls.add_argument("--json", action="store_true", help="print the jobs as JSON")
    ls.set_defaults(run=console._list)
    cn = cmd("cancel", "Cancel a pending or running job; running ToDos finish, nothing new starts.")
    cn.add_argument("job", help="the job id")
    cn.set_defaults(run=console._job_action)
    rt = cmd("retry", "Retry a failed or cancelled job from where it stopped.")
    rt.add_argument("job", help="the job id")
    rt.set_defaults(run=console._job_action)
    sc = cmd("schedule", "Manage recurring schedules (cron in a time zone).")
    scs = sc.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = scs.add_parser("add", formatter_class=fmt, help="create a schedule",
                         description="Create a schedule: each occurrence of CRON runs TEXT as a job.")  # fmt: skip
    add.add_argument("cron", help="5 fields: minute hour day month weekday, e.g. '0 8 * * 1'")
    add.add_argument("text", help="the request each run submits, e.g. 'Check my email'")
    add.add_argument("--time-zone", default=console._local_zone(), help="IANA zone CRON is read in")
    scs.add_parser("list", formatter_class=fmt, help="list the tenant's schedules",
                   description="List the tenant's schedules.")  # fmt: skip
    for verb, text in (("pause", "pause a schedule (no runs until resumed)"),
                       ("resume", "resume a schedule from its next occurrence"),
                       ("delete", "delete a schedule (its jobs stay)")):  # fmt: skip
        one = scs.add_parser(
            verb, formatter_class=fmt, help=text, description=text.capitalize() + "."
        )
        one.add_argument("schedule", help="the schedule id")
    sc.set_defaults(run=console._schedule)
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
    ag.set_defaults(run=console._agent)
    cmd("migrate", "Apply the database migrations.").set_defaults(run=host._migrate)
    r = cmd("route", "Show which intent and plan a text maps to (no server needed).")
    r.add_argument("text", help="the request text")
    r.add_argument("--time-zone", default="UTC", help="IANA zone times in TEXT are read in")
    r.set_defaults(run=host._route)
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
    d.set_defaults(run=host._dispatch)
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
