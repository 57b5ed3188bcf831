"""Pure logic: turning a DSN into arguments and environment for libpq client programs.

The password (if a DSN carries one) goes into the child's environment, never into argv where
``ps`` would show it.
"""

from __future__ import annotations

from psycopg import conninfo

_ENV = {
    "host": "PGHOST", "hostaddr": "PGHOSTADDR", "port": "PGPORT", "user": "PGUSER",
    "dbname": "PGDATABASE", "password": "PGPASSWORD", "sslmode": "PGSSLMODE",
    "sslrootcert": "PGSSLROOTCERT", "sslcert": "PGSSLCERT", "sslkey": "PGSSLKEY",
    "connect_timeout": "PGCONNECT_TIMEOUT", "passfile": "PGPASSFILE", "options": "PGOPTIONS",
    "application_name": "PGAPPNAME", "target_session_attrs": "PGTARGETSESSIONATTRS",
}


def client_env(dsn: str, dbname: str | None = None) -> dict[str, str]:
    """PG* environment variables equivalent to ``dsn`` (optionally for another database)."""
    parts = conninfo.conninfo_to_dict(dsn)
    if dbname is not None:
        parts["dbname"] = dbname
    parts.setdefault("connect_timeout", "10")
    env = {}
    for key, value in parts.items():
        if key in _ENV and value is not None:
            env[_ENV[key]] = str(value)
    env.setdefault("PGAPPNAME", "gravl-dr")
    return env
