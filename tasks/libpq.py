"""Pure logic: turning a DSN into arguments and environment for libpq client programs.

The password (if a DSN carries one) goes into the child's environment, never into argv where
``ps`` would show it.
"""

from __future__ import annotations

from psycopg import ProgrammingError, conninfo

from tasks.errors import ConfigError

_ENV = {
    "host": "PGHOST",
    "hostaddr": "PGHOSTADDR",
    "port": "PGPORT",
    "user": "PGUSER",
    "dbname": "PGDATABASE",
    "password": "PGPASSWORD",
    "sslmode": "PGSSLMODE",
    "sslrootcert": "PGSSLROOTCERT",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "connect_timeout": "PGCONNECT_TIMEOUT",
    "passfile": "PGPASSFILE",
    "options": "PGOPTIONS",
    "application_name": "PGAPPNAME",
    "target_session_attrs": "PGTARGETSESSIONATTRS",
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


def split_password(dsn: str) -> tuple[str, str | None]:
    """(the DSN without its password, the password or None). Secrets never travel in a DSN that
    could become a flow parameter, a log line or an exception: the password goes to libpq
    through the environment (PGPASSWORD) of the processes that need it instead."""
    try:
        parts = conninfo.conninfo_to_dict(dsn)
    except ProgrammingError:
        raise ConfigError("--dsn is not a valid libpq connection string") from None
    password = parts.pop("password", None)
    if parts.get("sslpassword") is not None:
        raise ConfigError(
            "--dsn carries an sslpassword: gravl-dr takes no secret in a DSN "
            "(use an unencrypted client key file readable only by this user)"
        )
    if password is None:
        return dsn, None
    return conninfo.make_conninfo("", **{k: v for k, v in parts.items() if v is not None}), str(password)


def has_password(dsn: str) -> bool:
    """True when a DSN carries a password (or an sslpassword)."""
    try:
        parts = conninfo.conninfo_to_dict(dsn)
    except ProgrammingError:
        return False
    return parts.get("password") is not None or parts.get("sslpassword") is not None
