"""Adapter: what a source cluster is made of — tablespaces, databases and their properties,
what PostgreSQL will not carry over — and who is holding the lock a backup waits for.

Every query here runs with lock_timeout and statement_timeout (``guarded_dsn``): gravl-dr never
waits forever behind a user's lock.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import conninfo

from tasks.errors import PreconditionFailed
from tasks.models import DatabaseEntry, DatabaseSetting, NotCarriedOver, TablespaceEntry
from tasks.postgres import connection, with_dbname

log = logging.getLogger(__name__)


def guarded_dsn(
    dsn: str, lock_timeout: float, statement_timeout: float, *, check_client: bool = False
) -> str:
    """``dsn`` with lock_timeout and statement_timeout set for the whole session (libpq
    ``options``, so client programs such as pg_dump get them through PGOPTIONS too)."""
    parts = conninfo.conninfo_to_dict(dsn)
    extra = f"-c lock_timeout={int(lock_timeout * 1000)} -c statement_timeout={int(statement_timeout * 1000)}"
    if check_client:
        extra += " -c client_connection_check_interval=1000"
    old = str(parts.get("options") or "").strip()
    return conninfo.make_conninfo(dsn, options=f"{old} {extra}".strip())


# ---------------------------------------------------------------- tablespaces and databases


def tablespaces(conn: psycopg.Connection[Any]) -> list[TablespaceEntry]:
    rows = conn.execute(
        "SELECT oid::text, spcname, pg_tablespace_location(oid) FROM pg_tablespace "
        "WHERE spcname NOT IN ('pg_default', 'pg_global') ORDER BY oid"
    ).fetchall()
    return [TablespaceEntry(oid=r[0], name=r[1], location=r[2] or "") for r in rows]


def databases(conn: psycopg.Connection[Any]) -> list[DatabaseEntry]:
    """Every database but template0, with owner, encoding, locale, ACL, comment and settings."""
    rows = conn.execute(
        """
        SELECT d.datname, d.oid::text, pg_get_userbyid(d.datdba), pg_encoding_to_char(d.encoding),
               d.datcollate, d.datctype,
               CASE d.datlocprovider WHEN 'i' THEN 'icu' ELSE 'libc' END, d.daticulocale,
               t.spcname, d.datconnlimit, d.datistemplate, d.datallowconn, d.datacl::text,
               shobj_description(d.oid, 'pg_database')
        FROM pg_database d JOIN pg_tablespace t ON t.oid = d.dattablespace
        WHERE d.datname <> 'template0'
        ORDER BY d.datname
        """
    ).fetchall()
    settings: dict[str, list[DatabaseSetting]] = {}
    for datname, rolname, config in conn.execute(
        """
        SELECT d.datname, r.rolname, s.setconfig FROM pg_db_role_setting s
        JOIN pg_database d ON d.oid = s.setdatabase LEFT JOIN pg_roles r ON r.oid = s.setrole
        ORDER BY 1, 2 NULLS FIRST
        """
    ).fetchall():
        for item in config or []:
            name, _, value = str(item).partition("=")
            settings.setdefault(datname, []).append(DatabaseSetting(role=rolname, name=name, value=value))
    return [
        DatabaseEntry(
            name=r[0],
            oid=r[1],
            owner=r[2],
            encoding=r[3],
            collate=r[4],
            ctype=r[5],
            locale_provider=r[6],
            icu_locale=r[7],
            tablespace=r[8],
            connection_limit=int(r[9]),
            is_template=bool(r[10]),
            allow_connections=bool(r[11]),
            acl=r[12],
            comment=r[13],
            settings=settings.get(r[0], []),
        )
        for r in rows
    ]


def databases_to_count(dsn: str) -> list[DatabaseEntry]:
    """The databases whose tables a physical backup counts: connectable, not templates."""
    with connection(dsn) as conn:
        return [d for d in databases(conn) if d.allow_connections and not d.is_template]


def select_databases(found: list[DatabaseEntry], wanted: str | list[str]) -> list[DatabaseEntry]:
    """The databases a logical backup covers; names that do not exist are an error, and a
    database that refuses connections is kept (marked skipped), never dropped silently."""
    by_name = {d.name: d for d in found}
    if wanted == "all":
        chosen = [d for d in found if not (d.name == "template1" and not d.allow_connections)]
    else:
        missing = [n for n in wanted if n not in by_name]
        if missing:
            raise PreconditionFailed(
                f"backup.databases names database(s) the server does not have: {', '.join(missing)}"
            )
        chosen = [by_name[n] for n in wanted]
    return [
        d
        if d.allow_connections
        else d.model_copy(
            update={
                "skipped": "datallowconn is false: the database accepts no connections, so it cannot be dumped"
            }
        )
        for d in chosen
    ]


def not_carried_over(dsn: str, dbnames: list[str], *, data_directory: str | None) -> NotCarriedOver:
    """Unlogged tables, replication slots, prepared transactions, config files outside PGDATA."""
    unlogged: dict[str, list[str]] = {}
    for db in dbnames:
        with connection(with_dbname(dsn, db)) as conn:
            rows = conn.execute(
                "SELECT n.nspname || '.' || c.relname FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE c.relpersistence = 'u' AND c.relkind IN ('r', 'p') ORDER BY 1"
            ).fetchall()
        if rows:
            unlogged[db] = [r[0] for r in rows]
    with connection(dsn) as conn:
        slots = [
            f"{r[0]} ({r[1]})"
            for r in conn.execute(
                "SELECT slot_name, slot_type FROM pg_replication_slots WHERE NOT temporary ORDER BY 1"
            )
        ]
        prepared = [
            f"{r[0]} (database {r[1]}, owner {r[2]}, prepared {r[3]:%Y-%m-%d %H:%M:%S %Z})"
            for r in conn.execute(
                "SELECT gid, database, owner, prepared FROM pg_prepared_xacts ORDER BY prepared"
            )
        ]
        outside: list[str] = []
        if data_directory:
            for name in ("config_file", "hba_file", "ident_file"):
                row = conn.execute("SELECT current_setting(%s, true)", [name]).fetchone()
                path = str(row[0]) if row and row[0] else ""
                if path and not path.startswith(data_directory.rstrip("/") + "/"):
                    outside.append(path)
    return NotCarriedOver(
        unlogged_tables=unlogged,
        replication_slots=slots,
        prepared_transactions=prepared,
        config_outside_pgdata=outside,
    )


# ---------------------------------------------------------------- who holds the lock


@dataclass(frozen=True)
class Blocker:
    relation: str
    mode: str
    description: str


_BLOCKERS = """
WITH held AS (
    SELECT * FROM pg_locks
    WHERE granted AND locktype = 'relation' AND mode = 'AccessExclusiveLock'
      AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND pid IS DISTINCT FROM pg_backend_pid()
)
SELECT coalesce(format('%I.%I', n.nspname, c.relname), h.relation::text), h.mode, h.pid,
       px.gid, px.owner, px.prepared,
       a.usename, a.application_name, a.state, a.xact_start, left(a.query, 80)
FROM held h
LEFT JOIN pg_class c ON c.oid = h.relation
LEFT JOIN pg_namespace n ON n.oid = c.relnamespace
-- a prepared transaction's locks have no pid; its xid lock shares their virtualtransaction
LEFT JOIN pg_locks x ON h.pid IS NULL AND x.pid IS NULL AND x.locktype = 'transactionid'
                     AND x.virtualtransaction = h.virtualtransaction
LEFT JOIN pg_prepared_xacts px ON px.transaction = x.transactionid
LEFT JOIN pg_stat_activity a ON a.pid = h.pid
ORDER BY px.prepared NULLS LAST, a.xact_start
"""


def lock_blockers(dsn: str) -> list[Blocker]:
    """Sessions and prepared transactions holding an ACCESS EXCLUSIVE lock on a table of the
    DSN's database (the only mode that blocks the ACCESS SHARE locks of pg_dump and count(*))."""
    found = []
    with connection(dsn) as conn:
        conn.execute("SET statement_timeout = '10s'")
        for rel, mode, pid, gid, owner, prepared, user, app, state, xact_start, query in conn.execute(
            _BLOCKERS
        ):
            if gid is not None:
                who = (
                    f"prepared transaction '{gid}' (owner {owner}, prepared "
                    f"{prepared:%Y-%m-%d %H:%M:%S %Z}; COMMIT PREPARED or ROLLBACK PREPARED it)"
                )
            elif pid is not None:
                since = f" since {xact_start:%Y-%m-%d %H:%M:%S %Z}" if xact_start else ""
                who = (
                    f"session pid {pid} (user {user}, application '{app or ''}', {state or 'unknown'}"
                    f"{since}: {' '.join((query or '').split())})"
                )
            else:
                who = "a prepared transaction"
            found.append(Blocker(str(rel), str(mode), who))
    return found


def describe_lock_wait(dsn: str, database: str, what: str) -> str:
    """One line for a backup step that gave up waiting for a lock: who holds it."""
    try:
        blockers = lock_blockers(dsn)
    except Exception as exc:  # noqa: BLE001 - the lock wait is the error to report
        log.warning("could not list lock holders: %s", exc)
        blockers = []
    if not blockers:
        return f"{what} in database {database} gave up waiting for a lock (lock_timeout)"
    first = blockers[0]
    more = f" (and {len(blockers) - 1} more lock(s))" if len(blockers) > 1 else ""
    return (
        f"{what} in database {database} gave up waiting for a lock: table {first.relation} is "
        f"locked {first.mode} by {first.description}{more}"
    )


__all__ = [
    "Blocker",
    "databases",
    "databases_to_count",
    "describe_lock_wait",
    "guarded_dsn",
    "lock_blockers",
    "not_carried_over",
    "select_databases",
    "tablespaces",
]
