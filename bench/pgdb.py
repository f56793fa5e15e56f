"""A database of a benchmark's own beside the one a PostgreSQL admin URL names."""

from __future__ import annotations


def _admin(url: str, sql: str) -> None:
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as c:
        c.exec_driver_sql(sql)
    engine.dispose()


def fresh_database(url: str, name: str) -> str:
    """A new, empty database ``name`` on ``url``'s server (one left by an earlier run is
    dropped first); its URL."""
    drop_database(url, name)
    _admin(url, f'CREATE DATABASE "{name}"')
    return url.rsplit("/", 1)[0] + "/" + name


def drop_database(url: str, name: str) -> None:
    """Drop database ``name`` on ``url``'s server, closing its connections."""
    _admin(url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
