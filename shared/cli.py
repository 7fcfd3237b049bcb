"""The ``cpa-scheduler`` command line: the local host of the same functions.

Implemented so far: ``migrate``, ``route`` and ``dispatch``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Sequence

from shared import catalogue, database, dispatch, errors, executor, intents, settings, store


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
    db = store.Store(url)
    dispatcher = dispatch.Dispatcher(
        db,
        registry=executor.builtin(http_allow=config.http_allow),
        concurrency=args.concurrency,
        lease_seconds=args.lease,
    )
    try:
        if args.once:
            return (await dispatcher.run_pass(args.budget)).as_dict()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print("dispatcher: running; SIGTERM stops it after the ToDos it holds.", file=sys.stderr)
        return (await dispatcher.run_forever(url, stop=stop)).as_dict()
    finally:
        await db.close()


def _dispatch(args: argparse.Namespace) -> int:
    print(json.dumps(asyncio.run(_dispatch_run(args))))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cpa-scheduler", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
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
    return code


if __name__ == "__main__":
    sys.exit(main())
