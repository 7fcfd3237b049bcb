"""The composition root: the one place that builds the parts the hosts share.

Every host gets its store (the connection pool), token verifier, rate limiter, executor
registry and dispatcher from :func:`build_services`: the API (``cpa_scheduler.api``), the
scheduled dispatcher (``cpa_scheduler.invocation``) and the CLI's ``serve`` and ``dispatch``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cpa_scheduler import database, settings, store

if TYPE_CHECKING:  # built on first use: see Services
    from cpa_scheduler import auth, dispatch, executor, ratelimit, wakeups


class Services:
    """One process's shared parts over one store, each built once and on first use.

    On first use, so that each Lambda function pays only for what it uses: the API function
    never imports the planner or the dispatcher, the dispatcher function never the token
    verifier (PyJWT, cryptography) or the Upstash client. The pool opens on its first query
    and warm invocations reuse it. A host or a test may hand in its own verifier or limiter.
    """

    def __init__(
        self,
        config: settings.Settings,
        db: store.Store,
        *,
        verifier: auth.Verifier | None = None,
        limiter: ratelimit.Limiter | None = None,
    ) -> None:
        self.config = config
        self.store = db
        self._verifier = verifier
        self._limiter = limiter
        self._registry: executor.Registry | None = None
        self._wakeups: wakeups.Listener | None = None

    @property
    def verifier(self) -> auth.Verifier:
        """Checks the callers' access tokens."""
        if self._verifier is None:
            from cpa_scheduler import auth

            self._verifier = auth.verifier(self.config)
        return self._verifier

    @property
    def limiter(self) -> ratelimit.Limiter:
        """Counts job creation per tenant."""
        if self._limiter is None:
            from cpa_scheduler import ratelimit

            self._limiter = ratelimit.limiter(self.config, self.store)
        return self._limiter

    @property
    def registry(self) -> executor.Registry:
        """The cloud executors by action, with the planner's when an LLM is configured."""
        if self._registry is None:
            from cpa_scheduler import planner

            self._registry = planner.registry_for(self.config, self.store)
        return self._registry

    @property
    def wakeups(self) -> wakeups.Listener:
        """The LISTEN connection that wakes long-polling desktop claims (started on first
        use by a long-running host; Lambda never starts it and polls)."""
        if self._wakeups is None:
            from cpa_scheduler import wakeups

            self._wakeups = wakeups.Listener(self.store.url, connect_timeout=self.store.timeout)
        return self._wakeups

    def dispatcher(self, **tuning: Any) -> dispatch.Dispatcher:
        """A new dispatcher over this store and registry, configured by the settings.

        ``tuning`` sets other fields of :class:`~cpa_scheduler.dispatch.Dispatcher`
        (``concurrency``, ``lease_seconds``), as the CLI's ``dispatch`` flags do."""
        from cpa_scheduler import dispatch

        return dispatch.Dispatcher(
            self.store,
            registry=self.registry,
            tenant_cap=self.config.tenant_cap,
            schedule_budget=self.config.schedule_jobs_per_minute,
            retention_days=self.config.retention_days,
            audit_retention_days=self.config.audit_retention_days,
            **tuning,
        )

    def stopping(self) -> None:
        """The host is stopping: long-polling claims answer at once instead of holding the
        server's exit for up to their 20 s."""
        if self._wakeups is not None:
            self._wakeups.stop()

    async def close(self) -> None:
        """Close the pool (a host that ends; Lambda never does)."""
        if self._wakeups is not None:
            await self._wakeups.close()
        await self.store.close()


def build_services(config: settings.Settings, *, url: str | None = None) -> Services:
    """The services of one process.

    ``url``: the database a host has prepared (the CLI, which migrates and stops the embedded
    server itself); without it the database is prepared here, as the Lambda functions do (in
    local mode: the embedded server is started and migrated).
    """
    if url is None:
        url = database.prepare(config, migrate=config.local)
    db = store.Store(
        url,
        max_size=config.pool_max_size,
        timeout=config.db_timeout,
        lost_lease_limit=config.lost_lease_limit,
    )
    return Services(config, db)
