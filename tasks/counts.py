"""Adapter: the per-table facts a backup records for its drill — exact row counts and the newest
timestamp of every user table of every database, read in ONE snapshot whose WAL position is
recorded with them, plus which tables are unlogged and what could not be counted, and why.

- One snapshot per database (PostgreSQL refuses to import a snapshot into another database),
  taken back to back and retaken until they are identical (see ``read_cluster_facts``).
- The LSN is read right after the snapshots are taken (``pg_current_wal_insert_lsn()``): every
  transaction they see has its commit record before it. The snapshots are recorded too
  (``pg_current_snapshot()``), so a drill paused at that LSN can prove that no transaction
  invisible to the counts had committed there (``pg_visible_in_snapshot``/``pg_xact_status``).
- Counting runs with ``row_security = off``: when row-level security would hide rows from the
  counting role, PostgreSQL raises an error instead of silently filtering, and the table is
  recorded as not counted, with the reason, instead of with a wrong number.
- The newest timestamp is ``greatest(extract(epoch FROM max(col)))`` over the table's timestamp
  columns, as numeric text: independent of TimeZone and DateStyle, exact to the microsecond.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import psycopg
from psycopg import conninfo, sql
from pydantic import BaseModel, ConfigDict, Field

from tasks.errors import DRError, PreconditionFailed, one_line
from tasks.postgres import connect, connection

log = logging.getLogger(__name__)

TIME_TYPES = ("timestamp with time zone", "timestamp without time zone")
_TABLES = """
SELECT n.nspname, c.relname, c.relpersistence = 'u',
       coalesce((SELECT array_agg(a.attname::text ORDER BY a.attnum) FROM pg_attribute a
                 WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                   AND format_type(a.atttypid, NULL) IN ('timestamp with time zone',
                                                         'timestamp without time zone')), '{}')
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%'
ORDER BY 1, 2
"""


class DatabaseFacts(BaseModel):
    """What one database held in the recorded snapshot."""

    model_config = ConfigDict(frozen=True)

    rows: dict[str, int] = Field(default_factory=dict, description="schema.table -> rows")
    newest: dict[str, str] = Field(
        default_factory=dict, description="schema.table -> newest timestamp as epoch seconds (numeric text)"
    )
    unlogged: list[str] = Field(default_factory=list)
    not_counted: dict[str, str] = Field(default_factory=dict, description="schema.table -> why not")


class ClusterFacts(BaseModel):
    """Facts of every database, read in one snapshot at ``lsn``."""

    model_config = ConfigDict(frozen=True)

    lsn: str | None = None
    snapshots: dict[str, str] = Field(default_factory=dict, description="database -> pg_current_snapshot()")
    databases: dict[str, DatabaseFacts] = Field(default_factory=dict)
    not_counted: dict[str, str] = Field(default_factory=dict, description="database -> why not")
    all_databases: list[str] = Field(default_factory=list, description="every non-template database")


def newest_expression(columns: Iterable[str], alias: str = "") -> sql.Composable:
    """greatest(extract(epoch FROM max(c)), ...) over the given columns (NULL when none has a value)."""
    prefix = sql.SQL(f"{alias}.") if alias else sql.SQL("")
    parts = [sql.SQL("extract(epoch FROM max({}{}))").format(prefix, sql.Identifier(c)) for c in columns]
    return sql.SQL("greatest({})").format(sql.SQL(", ").join(parts))


def database_facts(conn: psycopg.Connection[Any]) -> DatabaseFacts:
    """Facts of the connection's database, in its current transaction (the caller sets the
    snapshot). Each table is read under a savepoint: one refused table does not end the others."""
    conn.execute("SET LOCAL row_security = off")
    rows: dict[str, int] = {}
    newest: dict[str, str] = {}
    unlogged: list[str] = []
    not_counted: dict[str, str] = {}
    for schema, table, is_unlogged, time_cols in conn.execute(_TABLES).fetchall():
        name = f"{schema}.{table}"
        if is_unlogged:
            unlogged.append(name)
        target = sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(table))
        if time_cols:
            query = sql.SQL("SELECT count(*), ({})::text FROM {}").format(
                newest_expression(time_cols), target
            )
        else:
            query = sql.SQL("SELECT count(*), NULL FROM {}").format(target)
        conn.execute("SAVEPOINT gravl_count")
        try:
            row = conn.execute(query).fetchone()
        except psycopg.errors.InsufficientPrivilege as exc:
            conn.execute("ROLLBACK TO SAVEPOINT gravl_count")
            message = (exc.diag.message_primary or str(exc)).strip()
            if "row-level security" in message:
                reason = (
                    "row-level security would hide rows from the backup role: grant it BYPASSRLS "
                    "(infra/postgres/roles.sql) or back up as a superuser"
                )
            else:
                reason = f"the backup role cannot read it: {message}"
            not_counted[name] = reason
            log.warning("not counting %s: %s", name, reason)
            continue
        conn.execute("RELEASE SAVEPOINT gravl_count")
        assert row is not None
        rows[name] = int(row[0])
        if row[1] is not None:
            newest[name] = str(row[1])
    return DatabaseFacts(rows=rows, newest=newest, unlogged=unlogged, not_counted=not_counted)


def _begin(conn: psycopg.Connection[Any]) -> None:
    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")


def _count(conn: psycopg.Connection[Any], lock_timeout_seconds: float) -> DatabaseFacts:
    # never wait forever behind a user's lock (backup.lock_timeout_seconds)
    conn.execute(
        sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(f"{int(lock_timeout_seconds * 1000)}ms"))
    )
    return database_facts(conn)


SNAPSHOT_ATTEMPTS = 50


def _wal_position(conn: psycopg.Connection[Any]) -> str:
    row = conn.execute(
        "SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() "
        "ELSE pg_current_wal_insert_lsn() END::text"
    ).fetchone()
    assert row is not None
    return str(row[0])


def read_cluster_facts(
    dsn: str,
    *,
    snapshot_id: str | None = None,
    lsn: str | None = None,
    only: list[str] | None = None,
    explain_lock: Callable[[str], str] | None = None,
    lock_timeout_seconds: float = 30,
) -> ClusterFacts:
    """Facts of every database (or ``only`` these), each read in a REPEATABLE READ snapshot.

    With ``snapshot_id`` (an exported snapshot the caller keeps open, e.g. pg_dump's; one
    database) and its ``lsn``, that snapshot is used. Otherwise a transaction is opened in every
    database, their snapshots taken back to back and the WAL insert position read before and
    after them; PostgreSQL cannot share one snapshot across databases, and a commit between the
    snapshots and the LSN would be replayed but not counted, so this repeats (up to
    SNAPSHOT_ATTEMPTS times) until all the snapshots are identical and no WAL was written
    meanwhile — one snapshot, exactly at that LSN. Each database's snapshot is recorded either way, and the
    drill proves per database that no transaction it did not see had committed at the LSN."""
    with connection(dsn) as conn:
        here = str(conn.info.dbname)
        dbs = conn.execute(
            "SELECT datname, datallowconn FROM pg_database WHERE NOT datistemplate "
            "ORDER BY datname = current_database(), 1"
        ).fetchall()
    all_databases = sorted(str(r[0]) for r in dbs)
    wanted, not_counted = databases_to_count([(str(r[0]), bool(r[1])) for r in dbs], only)
    conns: dict[str, psycopg.Connection[Any]] = {}
    probe: psycopg.Connection[Any] | None = None
    try:
        conns = _connect_each(dsn, wanted, not_counted)
        probe = connect(dsn) if snapshot_id is None and conns else None
        snapshots, lsn = _take_snapshots(conns, probe, snapshot_id, lsn)
        databases = _count_each(conns, lock_timeout_seconds, explain_lock, not_counted)
    finally:
        for conn in [*conns.values(), *([probe] if probe is not None else [])]:
            conn.close()
    log.info(
        "row counts of %d database(s) read in snapshot(s) at %s (database %s)", len(databases), lsn, here
    )
    return ClusterFacts(
        lsn=lsn,
        snapshots={db: snapshots[db] for db in databases},
        databases=databases,
        not_counted=not_counted,
        all_databases=all_databases,
    )


def databases_to_count(
    databases: Sequence[tuple[str, bool]], only: Sequence[str] | None
) -> tuple[list[str], dict[str, str]]:
    """Of (name, datallowconn) in connection order, those to count (``only`` these, when given)
    and, by name, why the others that were wanted cannot be."""
    wanted: list[str] = []
    not_counted: dict[str, str] = {}
    for name, allowed in databases:
        if only is not None and name not in only:
            continue
        if not allowed:
            not_counted[name] = (
                "datallowconn = false: nobody may connect to it, so its rows could not be "
                "counted at backup time"
            )
            continue
        wanted.append(name)
    return wanted, not_counted


def snapshots_agree(snapshots: Mapping[str, str], before: str | None, after: str | None) -> bool:
    """One snapshot for every database, and no WAL written while they were taken."""
    return len(set(snapshots.values())) <= 1 and before == after


def _connect_each(
    dsn: str, wanted: Sequence[str], not_counted: dict[str, str]
) -> dict[str, psycopg.Connection[Any]]:
    """A connection (not in autocommit) to each database; one that fails is noted as not counted."""
    conns: dict[str, psycopg.Connection[Any]] = {}
    try:
        for name in wanted:  # the DSN's own database last: its snapshot is the one nearest the LSN
            try:
                conns[name] = connect(conninfo.make_conninfo(dsn, dbname=name), autocommit=False)
            except (DRError, psycopg.Error) as exc:
                not_counted[name] = f"could not be counted: {one_line(exc)}"
                log.warning("database %s not counted: %s", name, not_counted[name])
    except BaseException:
        for conn in conns.values():
            conn.close()
        raise
    return conns


def _snapshot_of(conn: psycopg.Connection[Any], snapshot_id: str | None) -> str:
    _begin(conn)
    if snapshot_id is not None:
        conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot_id)))
    row = conn.execute("SELECT pg_current_snapshot()::text").fetchone()
    assert row is not None
    return str(row[0])


def _take_snapshots(
    conns: Mapping[str, psycopg.Connection[Any]],
    probe: psycopg.Connection[Any] | None,
    snapshot_id: str | None,
    lsn: str | None,
) -> tuple[dict[str, str], str | None]:
    """Open a snapshot in every database, again and again until they agree (or the attempts run
    out); the snapshots, left open, and the LSN they were taken at (``lsn`` with no ``probe``)."""
    snapshots: dict[str, str] = {}
    for attempt in range(1, SNAPSHOT_ATTEMPTS + 1):
        before = _wal_position(probe) if probe is not None else None
        snapshots = {name: _snapshot_of(conn, snapshot_id) for name, conn in conns.items()}
        if probe is not None:
            # read after every snapshot was taken: each commit they see lies before this LSN;
            # with no WAL written since ``before`` either, none they miss does
            lsn = _wal_position(probe)
        if snapshots_agree(snapshots, before, lsn) or attempt == SNAPSHOT_ATTEMPTS:
            break
        for conn in conns.values():
            conn.rollback()
    if len(set(snapshots.values())) > 1:
        log.info(
            "databases counted in %d different snapshots (writes never paused): the drill checks "
            "each against the LSN",
            len(set(snapshots.values())),
        )
    return snapshots, lsn


def _count_each(
    conns: Mapping[str, psycopg.Connection[Any]],
    lock_timeout_seconds: float,
    explain_lock: Callable[[str], str] | None,
    not_counted: dict[str, str],
) -> dict[str, DatabaseFacts]:
    databases: dict[str, DatabaseFacts] = {}
    for name, conn in conns.items():
        try:
            databases[name] = _count(conn, lock_timeout_seconds)
        except psycopg.errors.LockNotAvailable:
            # a backup that meets a lock says whose (tasks.inventory), never waits forever
            raise PreconditionFailed(
                explain_lock(name)
                if explain_lock
                else f"counting rows in database {name} waited too long for a lock"
            ) from None
        except (DRError, psycopg.Error) as exc:
            not_counted[name] = f"could not be counted: {one_line(exc)}"
            log.warning("database %s not counted: %s", name, not_counted[name])
    return databases


def switch_wal(dsn: str) -> str | None:
    """pg_switch_wal(), so the segment holding the counts' LSN is archived soon; None when not
    allowed or on a standby (the drill then says it cannot reach the counts' LSN)."""
    try:
        with connection(dsn) as conn:
            row = conn.execute("SELECT pg_switch_wal()::text").fetchone()
        return str(row[0]) if row else None
    except (DRError, psycopg.Error) as exc:
        log.warning(
            "pg_switch_wal() not done (%s): the WAL of the row counts is archived when its segment fills",
            one_line(exc),
        )
        return None
