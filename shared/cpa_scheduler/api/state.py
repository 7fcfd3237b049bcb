"""Module-scope state of the API function, created lazily on first use.

Mangum runs the ASGI lifespan on every invocation, so the pool cannot live in a lifespan:
it is opened on first use and reused by warm invocations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from cpa_scheduler import auth, database, ratelimit, settings, store

if TYPE_CHECKING:  # the API function never runs a dispatcher; keep its cold import small
    from cpa_scheduler import dispatch


@dataclass
class State:
    config: settings.Settings
    store: store.Store
    verifier: auth.Verifier
    limiter: ratelimit.Limiter
    # The dispatcher running in this process (serve), whose liveness /readyz reports.
    dispatcher: dispatch.Health | None = None


_state: State | None = None


def get() -> State:
    global _state
    if _state is None:
        config = settings.from_env()
        db = store.Store(
            database.prepare(config, migrate=config.local),
            max_size=config.pool_max_size,
            timeout=config.db_timeout,
        )
        _state = State(config, db, auth.verifier(config), ratelimit.limiter(config, db))
    return _state


def set_state(state: State | None) -> None:
    """Install a state (the CLI's serve, tests) or forget it."""
    global _state
    _state = state
