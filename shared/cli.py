"""The ``cpa-scheduler`` command line: the local host of the same functions.

Implemented so far: ``migrate``, ``route`` and ``dispatch --once``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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


async def _dispatch_once(budget: float) -> dict[str, object]:
    config = settings.from_env()
    db = store.Store(database.prepare(config, migrate=config.local))
    try:
        registry = executor.builtin(http_allow=config.http_allow)
        summary = await dispatch.Dispatcher(db, registry=registry).run_pass(budget)
        return summary.as_dict()
    finally:
        await db.close()


def _dispatch(args: argparse.Namespace) -> int:
    if not args.once:
        print("Only 'dispatch --once' is available so far.", file=sys.stderr)
        return 2
    print(json.dumps(asyncio.run(_dispatch_once(args.budget))))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cpa-scheduler", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="apply the migrations").set_defaults(run=_migrate)
    r = sub.add_parser("route", help="show which intent and plan a text maps to")
    r.add_argument("text")
    r.set_defaults(run=_route)
    d = sub.add_parser("dispatch", help="run one dispatch pass, as the scheduled function does")
    d.add_argument("--once", action="store_true", help="run one pass and exit")
    d.add_argument("--budget", type=float, default=50.0, help="seconds the pass may run")
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
