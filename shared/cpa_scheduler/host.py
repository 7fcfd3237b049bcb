"""The command line's local host commands: ``serve``, ``dispatch``, ``migrate``, ``route``, and
``token`` and ``ui``, which mint local access tokens. They compose
:func:`cpa_scheduler.service.build_services`, the app and the dispatcher (see :mod:`cpa_scheduler.cli`).
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

from cpa_scheduler import (
    catalogue,
    database,
    dispatch,
    errors,
    intents,
    logs,
    service,
    settings,
    store,
    times,
    tracing,
)


def _migrate(args: argparse.Namespace) -> int:
    with database.prepared(settings.from_env(), migrate=True) as url:
        print(f"Migrations are applied to {url.split('@')[-1]}.")
    return 0


def _route(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from cpa_scheduler import intake

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
