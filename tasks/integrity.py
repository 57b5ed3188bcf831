"""Adapter: physical integrity checks of a restored instance — pg_verifybackup, amcheck, pg_checksums.

- ``pg_verifybackup`` compares the extracted files with the backup's own ``backup_manifest``
  (PostgreSQL 15's cannot read tar archives, so it runs on the extracted directory, before the
  server starts: recovery rewrites files). It also parses the WAL the backup needs with
  pg_waldump; ``-n`` skips that when the WAL is not in the backup (it comes from the archive).
- ``amcheck``'s ``bt_index_check(index, heapallindexed => true)`` on every valid btree index of
  every database: index structure, and every heap tuple present in the index. It takes only an
  AccessShareLock, so indexes are checked in parallel over a few connections. The heap part costs
  a single-threaded pass over the whole table (about 6 s per GiB of heap on one core, against
  about 0.5 s per GiB of index for the structure), so a drill may limit it to tables up to a
  size (``drill.heapallindexed_max_mb``): larger tables' indexes get the structure check, and the
  report names them.
- ``pg_checksums --check`` reads every block of the cleanly stopped cluster and verifies its
  checksum; only meaningful when the source has data checksums enabled.
"""

from __future__ import annotations

import logging
import queue
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import psycopg
from psycopg import sql

from tasks.drill import CheckResult
from tasks.errors import DRError, one_line
from tasks.postgres import connection
from tasks.proc import pg_bin, run

log = logging.getLogger(__name__)

MAX_SAMPLES = 20
_WAL_NAME = re.compile(r"^[0-9A-F]{24}$")


def _lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def wal_in_backup(pgdata: Path) -> bool:
    """True when the extracted backup carries WAL segments in pg_wal (pg_basebackup -X fetch/stream)."""
    wal = pgdata / "pg_wal"
    return wal.is_dir() and any(_WAL_NAME.match(p.name) for p in wal.iterdir())


def verify_backup_dir(
    pgdata: Path, *, bindir: str = "auto", os_user: str | None = None, timeout: float = 6 * 3600
) -> CheckResult:
    """pg_verifybackup on an extracted, not yet started data directory."""
    t0 = time.monotonic()
    name = "pg_verifybackup"
    if not (pgdata / "backup_manifest").exists():
        return CheckResult(
            name=name,
            kind=name,
            category="integrity",
            status="skipped",
            summary="the backup has no backup_manifest (taken without one)",
        )
    argv = [pg_bin("pg_verifybackup", bindir)]
    with_wal = wal_in_backup(pgdata)
    if not with_wal:
        argv.append("-n")  # WAL comes from the archive at recovery time
    argv.append(str(pgdata))
    proc = run(argv, timeout=timeout, os_user=os_user, check=False)
    out = _lines(proc.stdout) + _lines(proc.stderr)
    seconds = time.monotonic() - t0
    if proc.returncode == 0:
        what = "files and WAL" if with_wal else "files (WAL not in the backup: parsed at recovery)"
        return CheckResult(
            name=name,
            kind=name,
            category="integrity",
            status="passed",
            seconds=seconds,
            summary=f"{what} match backup_manifest",
        )
    errors = [ln for ln in out if "error" in ln.lower()] or out
    return CheckResult(
        name=name,
        kind=name,
        category="integrity",
        status="failed",
        seconds=seconds,
        summary=f"pg_verifybackup exited {proc.returncode}: {errors[0] if errors else ''}"[:500],
        samples=errors[:MAX_SAMPLES],
    )


_INDEX_QUERY = """
SELECT c.oid::bigint, quote_ident(n.nspname) || '.' || quote_ident(c.relname), pg_relation_size(c.oid),
       i.indrelid::regclass::text, pg_relation_size(i.indrelid)
FROM pg_index i
JOIN pg_class c ON c.oid = i.indexrelid
JOIN pg_am am ON am.oid = c.relam
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE am.amname = 'btree' AND c.relkind = 'i' AND i.indisvalid AND i.indisready AND c.relpersistence <> 't'
"""
# relkind 'i' only: a partitioned index (relkind 'I') has no storage of its own, and amcheck
# refuses it ("only B-Tree indexes are supported as targets"); its partitions' indexes are leaves.

# SQLSTATE classes amcheck reports corruption with (XX001 data_corrupted, XX002 index_corrupted,
# other XX internal errors raised on impossible page contents) and I/O errors (58030). Anything
# else (privileges, timeouts, unsupported objects) is the tool failing, not the data.
_CORRUPTION_STATES = ("XX", "58030")


def is_corruption(sqlstate: str | None) -> bool:
    return bool(sqlstate) and any(str(sqlstate).startswith(p) for p in _CORRUPTION_STATES)


class _Index(NamedTuple):
    oid: int
    name: str
    size: int
    table: str
    heap_size: int
    heapallindexed: bool


def _check_indexes(
    dsn: str, work: queue.SimpleQueue[_Index], timeout_ms: int, function: sql.Composable
) -> list[tuple[str, str, bool]]:
    """bt_index_check indexes taken from ``work`` on one connection until it is empty;
    (index, error, is corruption) for those that fail."""
    bad: list[tuple[str, str, bool]] = []
    query = sql.SQL("SELECT {}(%s::oid, %s)").format(function)
    with connection(dsn) as conn:
        conn.execute(f"SET statement_timeout = {int(timeout_ms)}")
        while True:
            try:
                index = work.get_nowait()
            except queue.Empty:
                break
            try:
                conn.execute(query, (index.oid, index.heapallindexed))
            except psycopg.errors.UndefinedTable:
                continue  # dropped meanwhile (nothing else writes here, but be exact)
            except psycopg.Error as exc:
                message = (exc.diag.message_primary or str(exc)).strip()
                detail = exc.diag.message_detail
                bad.append(
                    (index.name, message + (f" ({detail})" if detail else ""), is_corruption(exc.sqlstate))
                )
    return bad


def install_amcheck(conn: psycopg.Connection[Any]) -> sql.Composable:
    """CREATE EXTENSION amcheck if it is not there (the drill's sessions fire no user or event
    trigger and are not read-only: see tasks.drill.DRILL_OPTIONS); its qualified bt_index_check."""
    conn.execute("CREATE EXTENSION IF NOT EXISTS amcheck")
    row = conn.execute(
        "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace "
        "WHERE e.extname = 'amcheck'"
    ).fetchone()
    assert row is not None
    return sql.Identifier(str(row[0]), "bt_index_check")


def amcheck_database(
    dsn: str,
    database: str,
    *,
    jobs: int = 2,
    heapallindexed_max_mb: int | None = None,
    timeout_seconds: float = 6 * 3600,
) -> CheckResult:
    """Every valid btree index of one database through bt_index_check: with heapallindexed,
    except for indexes of tables whose heap is over ``heapallindexed_max_mb`` (None: no limit)."""
    t0 = time.monotonic()
    name = f"amcheck {database}"
    try:
        with connection(dsn) as conn:
            function = install_amcheck(conn)
            rows = conn.execute(_INDEX_QUERY).fetchall()
        limit = None if heapallindexed_max_mb is None else heapallindexed_max_mb * 2**20
        indexes = [
            _Index(int(r[0]), str(r[1]), int(r[2]), str(r[3]), int(r[4]), limit is None or int(r[4]) <= limit)
            for r in rows
        ]
        # Costliest first (the heap pass costs about ten times the index's own), each connection
        # taking the next one when it is free: the longest check starts at once.
        indexes.sort(key=lambda ix: ix.size + (ix.heap_size * 10 if ix.heapallindexed else 0), reverse=True)
        work: queue.SimpleQueue[_Index] = queue.SimpleQueue()
        for index in indexes:
            work.put(index)
        n = max(1, min(jobs, len(indexes)))
        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="amcheck") as pool:
            results = list(
                pool.map(lambda _: _check_indexes(dsn, work, int(timeout_seconds * 1000), function), range(n))
            )
    except (DRError, psycopg.Error) as exc:
        return CheckResult(
            name=name,
            kind="amcheck",
            category="integrity",
            status="failed",
            database=database,
            seconds=time.monotonic() - t0,
            summary=f"amcheck could not run: {one_line(exc)}",
        )
    failures = [item for share in results for item in share]
    bad = [(i, e) for i, e, corrupt in failures if corrupt]
    tool = [(i, e) for i, e, corrupt in failures if not corrupt]
    total_bytes = sum(ix.size for ix in indexes)
    seconds = time.monotonic() - t0
    partial = sorted({ix.table for ix in indexes if not ix.heapallindexed})
    scope = f"{len(indexes)} btree indexes ({total_bytes / 2**20:.1f} MiB) checked"
    if partial:
        structure_only = sum(1 for ix in indexes if not ix.heapallindexed)
        scope += (
            f", {len(indexes) - structure_only} with heapallindexed, {structure_only} structure "
            f"only (tables over drill.heapallindexed_max_mb = {heapallindexed_max_mb} MiB: "
            f"{', '.join(partial[:5])}{', ...' if len(partial) > 5 else ''})"
        )
    else:
        scope += " with heapallindexed"
    if bad:
        first = f"{bad[0][0]}: {bad[0][1]}"
        return CheckResult(
            name=name,
            kind="amcheck",
            category="integrity",
            status="failed",
            database=database,
            seconds=seconds,
            samples=[{"index": i, "error": e} for i, e in bad[:MAX_SAMPLES]],
            summary=f"{len(bad)} of {len(indexes)} btree indexes corrupt; first: {first} ({scope})"[:800],
        )
    if tool:
        first = f"{tool[0][0]}: {tool[0][1]}"
        return CheckResult(
            name=name,
            kind="amcheck",
            category="integrity",
            status="failed",
            database=database,
            seconds=seconds,
            samples=[{"index": i, "error": e} for i, e in tool[:MAX_SAMPLES]],
            summary=(
                f"no corruption found, but amcheck could not check {len(tool)} of {len(indexes)} btree "
                f"indexes (a tool error, not corruption); first: {first} ({scope})"
            )[:800],
        )
    return CheckResult(
        name=name,
        kind="amcheck",
        category="integrity",
        status="passed",
        database=database,
        seconds=seconds,
        summary=f"{scope}: no corruption"[:800],
    )


def checksums_check(
    pgdata: Path,
    *,
    enabled_in_source: bool,
    bindir: str = "auto",
    os_user: str | None = None,
    timeout: float = 6 * 3600,
) -> CheckResult:
    """pg_checksums --check on a cleanly stopped cluster."""
    name = "pg_checksums"
    if not enabled_in_source:
        return CheckResult(
            name=name,
            kind=name,
            category="integrity",
            status="skipped",
            summary="the source cluster has no data checksums",
        )
    t0 = time.monotonic()
    proc = run(
        [pg_bin("pg_checksums", bindir), "--check", "-D", str(pgdata)],
        timeout=timeout,
        os_user=os_user,
        check=False,
    )
    seconds = time.monotonic() - t0
    out = _lines(proc.stdout) + _lines(proc.stderr)
    stats = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in _lines(proc.stdout))}
    if proc.returncode == 0:
        return CheckResult(
            name=name,
            kind=name,
            category="integrity",
            status="passed",
            seconds=seconds,
            summary=f"{stats.get('Blocks scanned', '?')} blocks in "
            f"{stats.get('Files scanned', '?')} files, no checksum failure",
        )
    bad = [ln for ln in out if "checksum verification failed" in ln or "error" in ln.lower()] or out
    return CheckResult(
        name=name,
        kind=name,
        category="integrity",
        status="failed",
        seconds=seconds,
        samples=bad[:MAX_SAMPLES],
        summary=f"pg_checksums exited {proc.returncode}: "
        f"{stats.get('Bad checksums', '?')} bad checksum(s); {bad[0] if bad else ''}"[:500],
    )


def failed_check(
    name: str, kind: str, category: Any, exc: BaseException, seconds: float = 0.0, database: str | None = None
) -> CheckResult:
    """A check that could not run counts as failed, with the reason."""
    return CheckResult(
        name=name,
        kind=kind,
        category=category,
        status="failed",
        database=database,
        seconds=seconds,
        summary=one_line(exc),
    )
