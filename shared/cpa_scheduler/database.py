"""Where the database is: ``DATABASE_URL``, or the embedded server of local mode."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from cpa_scheduler import embedded, migration, settings


def prepare(config: settings.Settings, *, migrate: bool = True) -> str:
    """The app's connection URL; in local mode start the embedded server, bootstrap and migrate it.

    An embedded server started here keeps running after the process (the Lambda entries' local
    fallback); commands use :func:`prepared`, which stops it again.
    """
    if config.database_url:
        if migrate:
            migration.apply(config.database_url, migration.supabase_dir(config.supabase_dir))
        return config.database_url
    pg = embedded.EmbeddedPostgres(config.data_dir)
    url = pg.start()
    if migrate:
        _bootstrap_and_migrate(config, pg, url)
    return url


@contextlib.contextmanager
def prepared(config: settings.Settings, *, migrate: bool = True) -> Iterator[str]:
    """:func:`prepare` for the life of the block.

    In local mode the embedded server is used as a session: when the block ends (normally, by an
    exception or by Ctrl-C) a server that this or another command started is stopped once no
    other command uses it; a server that was already running on its own is left running.
    """
    if config.database_url:
        if migrate:
            migration.apply(config.database_url, migration.supabase_dir(config.supabase_dir))
        yield config.database_url
        return
    pg = embedded.EmbeddedPostgres(config.data_dir)
    with pg.session() as url:
        if migrate:
            _bootstrap_and_migrate(config, pg, url)
        yield url


def _bootstrap_and_migrate(
    config: settings.Settings, pg: embedded.EmbeddedPostgres, url: str
) -> None:
    folder = migration.supabase_dir(config.supabase_dir)
    migration.bootstrap(pg.url(user=embedded.SUPERUSER), folder)
    migration.apply(url, folder)
