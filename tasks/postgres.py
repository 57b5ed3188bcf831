"""Adapter: talking to PostgreSQL servers (psycopg 3) and reading what a backup needs to record."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import conninfo, sql

from tasks.errors import DRError, PermanentError, PreconditionFailed, TransientError, login_refused

log = logging.getLogger(__name__)


def safe_dsn(dsn: str) -> str:
    """A DSN fit for logs: host, port, user and dbname only — never a password."""
    try:
        parts = conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<invalid dsn>"
    keep = {k: parts[k] for k in ("host", "port", "user", "dbname") if k in parts}
    return " ".join(f"{k}={v}" for k, v in keep.items()) or "<default dsn>"


def dsn_field(dsn: str, name: str, default: str | None = None) -> str | None:
    value = conninfo.conninfo_to_dict(dsn).get(name)
    return str(value) if value is not None else default


def with_dbname(dsn: str, dbname: str) -> str:
    """The same DSN for another database of the cluster."""
    return conninfo.make_conninfo(dsn, dbname=dbname)


class ServerUnreachable(DRError):
    """The server did not accept a connection. Catch this; raise one of its two leaves."""


class ServerDown(ServerUnreachable, TransientError):
    """No answer, a refused TCP connection, a timeout, or a server that is starting up or full:
    a retry may succeed."""


class LoginRefused(ServerUnreachable, PermanentError):
    """The server answered and refused this login (password, pg_hba, role, database)."""


def connect(dsn: str, *, timeout: int = 5, autocommit: bool = True, **kw: Any) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(
            dsn, connect_timeout=timeout, autocommit=autocommit, application_name="gravl-dr", **kw
        )
    except psycopg.OperationalError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "connection failed"
        # never echo the DSN: libpq messages can contain it
        reason = reason.replace(dsn, "<dsn>")
        cls = LoginRefused if login_refused(reason) else ServerDown
        raise cls(f"cannot connect to {safe_dsn(dsn)}: {reason}") from None


@contextmanager
def connection(dsn: str, **kw: Any) -> Iterator[psycopg.Connection[Any]]:
    conn = connect(dsn, **kw)
    try:
        yield conn
    finally:
        conn.close()


@dataclass(frozen=True)
class ServerInfo:
    version_num: int
    version_text: str
    system_identifier: str
    timeline: int
    in_recovery: bool
    wal_segment_size: int
    data_checksums: bool
    current_lsn: str
    database: str
    data_directory: str | None
    is_superuser: bool


def server_info(dsn: str) -> ServerInfo:
    with connection(dsn) as conn:
        row = conn.execute(
            """
            SELECT current_setting('server_version_num')::int,
                   current_setting('server_version'),
                   (SELECT system_identifier::text FROM pg_control_system()),
                   pg_is_in_recovery(),
                   (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size'),
                   current_setting('data_checksums') = 'on',
                   CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()::text
                        ELSE pg_current_wal_lsn()::text END,
                   current_database(),
                   (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
            """
        ).fetchone()
        assert row is not None
        tli_row = conn.execute("SELECT timeline_id FROM pg_control_checkpoint()").fetchone()
        try:
            ddir = conn.execute("SELECT current_setting('data_directory')").fetchone()
            data_directory = ddir[0] if ddir else None
        except psycopg.Error:
            data_directory = None
    return ServerInfo(
        version_num=row[0],
        version_text=row[1],
        system_identifier=row[2],
        timeline=int(tli_row[0]) if tli_row else 1,
        in_recovery=bool(row[3]),
        wal_segment_size=int(row[4]),
        data_checksums=bool(row[5]),
        current_lsn=str(row[6] or "0/0"),
        database=row[7],
        data_directory=data_directory,
        is_superuser=bool(row[8]),
    )


def user_tables(conn: psycopg.Connection[Any]) -> list[tuple[str, str]]:
    rows = conn.execute(
        """
        SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
          AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%'
          AND NOT c.relispartition
        ORDER BY 1, 2
        """
    ).fetchall()
    return [(r[0], r[1]) for r in rows]


def count_rows(conn: psycopg.Connection[Any]) -> dict[str, int]:
    """Exact row counts of every user table, in the connection's current snapshot."""
    counts: dict[str, int] = {}
    for schema, table in user_tables(conn):
        query = sql.SQL("SELECT count(*) FROM {}.{}").format(sql.Identifier(schema), sql.Identifier(table))
        row = conn.execute(query).fetchone()
        counts[f"{schema}.{table}"] = int(row[0]) if row else 0
    return counts


def table_digest(conn: psycopg.Connection[Any], schema: str, table: str) -> tuple[int, str]:
    """(rows, md5 of all rows in order): compares table contents without moving them."""
    query = sql.SQL(
        "SELECT count(*), coalesce(md5(string_agg(t::text, E'\\n' ORDER BY t::text)), '') FROM {}.{} AS t"
    ).format(sql.Identifier(schema), sql.Identifier(table))
    row = conn.execute(query).fetchone()
    assert row is not None
    return int(row[0]), str(row[1])


def database_digest(dsn: str) -> dict[str, tuple[int, str]]:
    with connection(dsn) as conn:
        return {f"{s}.{t}": table_digest(conn, s, t) for s, t in user_tables(conn)}


def is_empty_database(dsn: str) -> bool:
    with connection(dsn) as conn:
        return not user_tables(conn)


def check_version(info: ServerInfo) -> None:
    if info.version_num < 120000:
        raise PreconditionFailed(f"PostgreSQL {info.version_text} is not supported (need 12 or newer)")


@dataclass(frozen=True)
class ReplicaLag:
    """One streaming replica as the primary sees it. ``replay_lag_bytes`` is None until the replica
    has reported its replay position (pg_stat_replication.replay_lsn is NULL right after it
    connects): unknown, never 0, which would read as "caught up"."""

    name: str
    state: str
    replay_lag_bytes: int | None


@dataclass(frozen=True)
class PrimaryStatus:
    """What the monitoring flow saw of the primary: up or not, and its streaming replicas."""

    up: bool
    in_recovery: bool = False
    replicas: tuple[ReplicaLag, ...] = ()
    error: str | None = None


def observe_primary(dsn: str, timeout: int = 5) -> PrimaryStatus:
    """Never raises: an unreachable primary is an observation (up=False), not an error."""
    try:
        with connection(dsn, timeout=timeout) as conn:
            conn.execute("SET statement_timeout = '10s'")
            rec = conn.execute("SELECT pg_is_in_recovery()").fetchone()
            rows = conn.execute(
                """
                SELECT coalesce(nullif(application_name, ''), client_addr::text, pid::text), state,
                       pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint
                FROM pg_stat_replication WHERE NOT pg_is_in_recovery() ORDER BY 1
                """
            ).fetchall()
    except (ServerUnreachable, psycopg.Error) as exc:
        return PrimaryStatus(
            up=False, error=str(exc).strip().splitlines()[0] if str(exc).strip() else "error"
        )
    return PrimaryStatus(
        up=True,
        in_recovery=bool(rec[0]) if rec else False,
        replicas=tuple(ReplicaLag(str(r[0]), str(r[1]), None if r[2] is None else int(r[2])) for r in rows),
    )
