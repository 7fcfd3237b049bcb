"""Where the database is: ``DATABASE_URL``, or the embedded server of local mode."""

from __future__ import annotations

from cpa_scheduler import embedded, migration, settings


def prepare(config: settings.Settings, *, migrate: bool = True) -> str:
    """The app's connection URL; in local mode start the embedded server, bootstrap and migrate it."""
    if config.database_url:
        if migrate:
            migration.apply(config.database_url)
        return config.database_url
    pg = embedded.EmbeddedPostgres(config.data_dir)
    url = pg.start()
    if migrate:
        migration.bootstrap(pg.url(user=embedded.SUPERUSER))
        migration.apply(url)
    return url
