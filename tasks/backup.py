"""Adapter: the backup procedure's steps as plain functions (the flow wraps them as tasks).

Preflight -> lock -> stream (pg_basebackup or pg_dump through encode() into the repository) ->
verify -> publish manifest (the commit point) -> unlock. A backup without a manifest does not
exist; the objects of a failed attempt are removed before a retry or a new attempt.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import psycopg
from psycopg import sql

from tasks import inventory
from tasks.basebackup import BaseBackupStream, slot_name
from tasks.config import Config
from tasks.counts import ClusterFacts, DatabaseFacts, database_facts, read_cluster_facts, switch_wal
from tasks.errors import (
    AlreadyExists,
    ChecksumMismatch,
    CommandFailed,
    DRError,
    Locked,
    NotFound,
    PreconditionFailed,
    one_line,
)
from tasks.libpq import client_env
from tasks.models import (
    BACKUP_ID_RE,
    DatabaseEntry,
    Manifest,
    NotCarriedOver,
    StoredObject,
    TablespaceEntry,
    backup_time,
    new_backup_id,
    parse_lsn,
    parse_manifest,
    wal_file_name,
)
from tasks.pgcluster import pid_alive
from tasks.postgres import (
    ServerInfo,
    check_version,
    connection,
    safe_dsn,
    server_info,
    with_dbname,
)
from tasks.proc import pg_bin, popen
from tasks.repository import FileRepository, Repository
from tasks.streams import (
    CODEC_SUFFIX,
    ENC_SUFFIX,
    STREAM_ALG,
    ProcessSource,
    consume,
    decode,
    encode,
    key_fingerprint,
    load_key,
    verified,
)

log = logging.getLogger(__name__)

LOCK_KEY = "locks/backup.lock"
MANIFEST_NAME = "manifest.json"
STALE_LOCK_SECONDS = 24 * 3600


def backup_prefix(backup_id: str) -> str:
    return f"backups/{backup_id}"


def manifest_key(backup_id: str) -> str:
    return f"backups/{backup_id}/manifest.json"


@dataclass(frozen=True)
class Preflight:
    backup_id: str
    kind: str
    info: ServerInfo
    codec: str
    encrypted: bool
    key_fingerprint: str | None
    database_bytes: int
    free_bytes: int | None
    messages: tuple[str, ...] = ()
    tablespaces: tuple[TablespaceEntry, ...] = ()
    databases: tuple[DatabaseEntry, ...] = ()


@dataclass(frozen=True)
class StreamResult:
    objects: tuple[StoredObject, ...]
    start_lsn: str | None
    stop_lsn: str | None
    timeline: int
    start_time: datetime
    stop_time: datetime
    row_counts: dict[str, dict[str, int]]
    row_counts_exact: bool
    seconds: float
    tablespaces: tuple[TablespaceEntry, ...] = ()
    databases: tuple[DatabaseEntry, ...] = ()
    globals_object: str | None = None
    not_carried_over: NotCarriedOver = NotCarriedOver()
    facts: ClusterFacts | None = None


@dataclass(frozen=True)
class VerifyResult:
    backup_id: str
    objects: int
    bytes_read: int
    seconds: float
    deep: bool


# ---------------------------------------------------------------- preflight


def preflight(cfg: Config, repo: Repository, kind: str, now: datetime | None = None) -> Preflight:
    """Check everything a backup needs, with no side effect: server, version, space, lock."""
    if kind not in ("physical", "logical"):
        raise PreconditionFailed(f"unknown backup kind {kind!r} (physical or logical)")
    repo.check(write=False) if not isinstance(repo, FileRepository) else repo.check(write=True)
    key = load_key(cfg.repository.encryption_key_env)
    info = server_info(cfg.primary.dsn)
    check_version(info)
    messages = [
        f"server {safe_dsn(cfg.primary.dsn)} is PostgreSQL {info.version_text}, "
        f"system identifier {info.system_identifier}, timeline {info.timeline}"
    ]
    if info.in_recovery and kind == "physical":
        messages.append("server is a standby: backing up from it")
    dsn = source_dsn(cfg, info.version_num)
    with connection(dsn) as conn:
        row = conn.execute("SELECT sum(pg_database_size(oid))::bigint FROM pg_database").fetchone()
        db_row = row
        found_tablespaces = inventory.tablespaces(conn)
        found_databases = inventory.databases(conn)
        if kind == "physical":
            if info.version_num < 150000:
                raise PreconditionFailed(
                    f"PostgreSQL {info.version_text}: physical backups need PostgreSQL 15 or newer "
                    "(BASE_BACKUP's COPY sub-protocol); take a logical backup"
                )
            messages += _physical_readiness(conn, dsn, found_tablespaces)
    chosen: list[DatabaseEntry] = []
    if kind == "logical":
        chosen = inventory.select_databases(found_databases, cfg.backup.databases)
        messages += _logical_readiness(dsn, info, chosen)
    database_bytes = int(row[0] or 0) if row else 0
    del db_row
    free: int | None = None
    if isinstance(repo, FileRepository):
        free = repo.free_bytes()
        need = database_bytes if cfg.repository.compression == "none" else database_bytes // 2
        if free < need:
            raise PreconditionFailed(
                f"repository {repo.url} has {free >> 20} MiB free, a {kind} backup of "
                f"{database_bytes >> 20} MiB may need {need >> 20} MiB"
            )
        messages.append(f"repository has {free >> 20} MiB free for about {database_bytes >> 20} MiB of data")
    lock = read_lock(repo)
    if lock is not None and not lock_is_stale(lock, repo):
        raise Locked(
            f"another backup of this cluster is running ({lock.get('backup_id')} on "
            f"{lock.get('host')} since {lock.get('started')})"
        )
    backup_id = new_backup_id(kind, now)
    if repo.exists(manifest_key(backup_id)):
        raise AlreadyExists(f"backup {backup_id} already exists; try again in a second")
    return Preflight(
        backup_id=backup_id,
        kind=kind,
        info=info,
        codec=cfg.repository.compression,
        encrypted=key is not None,
        key_fingerprint=key_fingerprint(key) if key else None,
        database_bytes=database_bytes,
        free_bytes=free,
        messages=tuple(messages),
        tablespaces=tuple(found_tablespaces),
        databases=tuple(chosen),
    )


def source_dsn(cfg: Config, version_num: int = 0) -> str:
    """The primary's DSN with lock_timeout and statement_timeout on every statement (and, from
    PostgreSQL 14, client_connection_check_interval: a session of ours whose client is gone
    stops waiting for a lock at once instead of at lock_timeout)."""
    return inventory.guarded_dsn(
        cfg.primary.dsn,
        cfg.backup.lock_timeout_seconds,
        cfg.backup.statement_timeout_seconds,
        check_client=version_num >= 140000,
    )


def _physical_readiness(conn: Any, dsn: str, spaces: list[TablespaceEntry]) -> list[str]:
    """What makes BASE_BACKUP fail, found before the server is asked for a checkpoint:
    wal_level, a free WAL sender and replication slot, the REPLICATION privilege, pg_hba."""
    row = conn.execute(
        """
        SELECT current_setting('wal_level'), current_setting('max_wal_senders')::int,
               (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender')::int,
               current_setting('max_replication_slots')::int,
               (SELECT count(*) FROM pg_replication_slots)::int,
               (SELECT rolsuper OR rolreplication FROM pg_roles WHERE rolname = current_user),
               current_user
        """
    ).fetchone()
    wal_level, senders, used_senders, slots, used_slots, may_replicate, user = row
    if wal_level == "minimal":
        raise PreconditionFailed(
            "wal_level is minimal: a physical backup needs wal_level = replica "
            "(or logical); change it and restart the server"
        )
    if used_senders >= senders:
        raise PreconditionFailed(
            f"max_wal_senders = {senders} and {used_senders} in use: a physical "
            "backup needs one free WAL sender"
        )
    if used_slots >= slots:
        raise PreconditionFailed(
            f"max_replication_slots = {slots} and {used_slots} in use: a physical "
            "backup reserves its WAL with a temporary slot and needs one free"
        )
    if not may_replicate:
        raise PreconditionFailed(
            f"role {user} has neither SUPERUSER nor REPLICATION: a physical backup "
            "needs the REPLICATION attribute"
        )
    for space in spaces:
        if not space.location:
            raise PreconditionFailed(
                f"tablespace {space.name} has no location (an in-place tablespace): "
                "not supported by a physical backup"
            )
    # pg_hba.conf is only known by trying: IDENTIFY_SYSTEM changes nothing on the server
    with BaseBackupStream(dsn, label="preflight", slot="unused") as probe:
        probe.identify()
    lines = [
        f"wal_level {wal_level}, WAL senders {used_senders}/{senders} in use, replication slots "
        f"{used_slots}/{slots}; replication connection as {user} accepted"
    ]
    if spaces:
        lines.append(
            "tablespaces, each its own archive: " + ", ".join(f"{t.name} ({t.location})" for t in spaces)
        )
    return lines


NO_PASSWORDS = (
    "role passwords will NOT be in the backup: the backup role is not a superuser, and "
    "password hashes are only readable from pg_authid (roles are dumped without them)"
)


def _logical_readiness(dsn: str, info: ServerInfo, chosen: list[DatabaseEntry]) -> list[str]:
    lines = []
    if not info.is_superuser:
        lines.append(NO_PASSWORDS)
    for db in chosen:
        if db.skipped:
            lines.append(f"database {db.name} will NOT be dumped: {db.skipped}")
            continue
        with connection(with_dbname(dsn, db.name)):
            pass
    dumped = [d.name for d in chosen if not d.skipped]
    lines.append(
        f"globals (roles, memberships, role settings, tablespaces) and {len(dumped)} "
        f"database(s): {', '.join(dumped)}"
    )
    return lines


# ---------------------------------------------------------------- lock


def read_lock(repo: Repository) -> dict[str, Any] | None:
    try:
        data = repo.get_bytes(LOCK_KEY)
    except NotFound:
        return None
    try:
        lock = json.loads(data)
        return lock if isinstance(lock, dict) else {"corrupt": True}
    except ValueError:
        return {"corrupt": True}


def lock_is_stale(lock: dict[str, Any], repo: Repository | None = None) -> bool:
    """A lock is stale when its holder on this host is gone, its backup is already complete
    (the manifest exists: only the release was lost), or it is older than a day."""
    if lock.get("corrupt"):
        return True
    started = float(lock.get("epoch", 0))
    if time.time() - started > STALE_LOCK_SECONDS:
        return True
    if lock.get("host") == socket.gethostname() and not pid_alive(int(lock.get("pid", 0))):
        return True
    bid = lock.get("backup_id")
    if repo is not None and isinstance(bid, str) and BACKUP_ID_RE.match(bid):
        with contextlib.suppress(DRError):
            if repo.exists(manifest_key(bid)):
                return True
    return False


def put_commit_point(repo: Repository, key: str, data: bytes) -> bool:
    """Write a commit point put-if-absent. When the name exists already with the very same bytes
    (a retried write whose first reply was lost), that is success: returns False ("was there").
    Other bytes under the name raise AlreadyExists."""
    try:
        repo.put_bytes(key, data)
        return True
    except AlreadyExists:
        try:
            existing = repo.get_bytes(key)
        except NotFound:
            raise AlreadyExists(f"{key} was reported existing, then vanished; try again") from None
        if existing == data:
            log.info("%s was already written with the same content (a lost reply): done", key)
            return False
        raise


def _lock_body(backup_id: str) -> bytes:
    return json.dumps(
        {
            "backup_id": backup_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "epoch": time.time(),
        }
    ).encode()


def acquire_lock(repo: Repository, backup_id: str) -> None:
    body = _lock_body(backup_id)
    try:
        repo.put_bytes(LOCK_KEY, body)
        return
    except AlreadyExists:
        pass
    lock = read_lock(repo)
    if lock is not None and lock.get("backup_id") == backup_id:
        # our own write, whose reply was lost (the SDK retried it and met If-None-Match)
        log.info("the backup lock already names %s: it is ours", backup_id)
        return
    if lock is not None and not lock_is_stale(lock, repo):
        raise Locked(f"another backup of this cluster is running ({lock.get('backup_id')})")
    log.warning("removing stale backup lock of %s", (lock or {}).get("backup_id"))
    repo.delete(LOCK_KEY)
    try:
        repo.put_bytes(LOCK_KEY, body)
    except AlreadyExists:
        lock = read_lock(repo)
        if lock is not None and lock.get("backup_id") == backup_id:
            return
        raise Locked("another backup took the lock at the same moment") from None


def release_lock(repo: Repository, backup_id: str, attempts: int = 4, pause: float = 0.5) -> bool:
    """Remove the lock if it is ours. Never raises for a repository error: a lock left behind
    names a backup that is over (complete, or failed with its process gone), which the next run
    treats as stale; ``gravl-dr unlock`` removes it at once. Returns whether it is gone."""
    for attempt in range(attempts):
        try:
            lock = read_lock(repo)
            if lock is None or lock.get("backup_id") != backup_id:
                return True
            repo.delete(LOCK_KEY)
            return True
        except DRError as exc:
            if attempt + 1 == attempts:
                log.warning(
                    "could not release the backup lock of %s (%s); the next backup "
                    "takes it over, or run gravl-dr unlock",
                    backup_id,
                    one_line(exc),
                )
                return False
            time.sleep(pause * (2**attempt))
    return False


def describe_lock(lock: dict[str, Any]) -> str:
    if lock.get("corrupt"):
        return "an unreadable lock"
    return (
        f"the lock of backup {lock.get('backup_id')} (host {lock.get('host')}, pid "
        f"{lock.get('pid')}, since {lock.get('started')})"
    )


def break_lock(repo: Repository, force: bool = False) -> str:
    """``gravl-dr unlock``: remove the repository lock when its holder is gone. A holder alive on
    this host is never removed; one on another host (which cannot be checked from here) only with
    ``force``. Returns what was done, one line."""
    lock = read_lock(repo)
    if lock is None:
        return f"no backup lock is held in {repo.url}"
    what = describe_lock(lock)
    here = lock.get("host") == socket.gethostname()
    if here and not lock.get("corrupt") and pid_alive(int(lock.get("pid", 0))):
        raise PreconditionFailed(
            f"{what} belongs to a process that is running on this host; not removed (stop that backup first)"
        )
    if not lock_is_stale(lock, repo) and not force:
        raise PreconditionFailed(
            f"{what} may belong to a running backup on another host; "
            "run unlock --force once you know it is dead"
        )
    if read_lock(repo) != lock:
        raise Locked("the lock changed while it was examined; look again")
    repo.delete(LOCK_KEY)
    log.warning("removed %s", what)
    return f"removed {what}"


# ---------------------------------------------------------------- stream


def discard_incomplete(repo: Repository, backup_id: str) -> int:
    """Delete the objects of an attempt that has no manifest (never those of a real backup)."""
    if repo.exists(manifest_key(backup_id)):
        raise PreconditionFailed(f"backup {backup_id} is complete; refusing to discard it")
    keys = repo.list_keys(backup_prefix(backup_id))
    for key in keys:
        repo.delete(key)
    with contextlib.suppress(DRError):
        repo.abort_incomplete(backup_prefix(backup_id))
    if isinstance(repo, FileRepository):
        repo.prune_empty(backup_prefix(backup_id))
    return len(keys)


def _object_name(base: str, codec: str, encrypted: bool) -> str:
    return base + CODEC_SUFFIX[codec] + (ENC_SUFFIX if encrypted else "")


def _store(cfg: Config, repo: Repository, pre: Preflight, name: str, source: Iterable[bytes]) -> StoredObject:
    key = load_key(cfg.repository.encryption_key_env)
    stream, result = encode(source, pre.codec, key, cfg.repository.compression_level)
    put = repo.put_stream(f"{backup_prefix(pre.backup_id)}/{name}", stream)
    if put.size != result.stored.size or put.sha256 != result.stored.hexdigest():
        raise PreconditionFailed(f"{name}: repository recorded other bytes than were sent")
    return StoredObject(
        key=name,
        size=result.stored.size,
        sha256=result.stored.hexdigest(),
        raw_size=result.raw.size,
        raw_sha256=result.raw.hexdigest(),
    )


def stream_backup(cfg: Config, repo: Repository, pre: Preflight) -> StreamResult:
    """Run the backup and stream every object into the repository in one pass."""
    removed = discard_incomplete(repo, pre.backup_id)
    if removed:
        log.info("removed %d object(s) of an earlier failed attempt of %s", removed, pre.backup_id)
    if pre.kind == "physical":
        return _stream_physical(cfg, repo, pre)
    return _stream_logical(cfg, repo, pre)


def _stream_physical(cfg: Config, repo: Repository, pre: Preflight) -> StreamResult:
    """BASE_BACKUP over the replication protocol (tasks.basebackup): every tablespace its own
    archive object, WAL reserved by a temporary slot for the whole backup and included."""
    t0 = time.monotonic()
    start_time = datetime.now(UTC)
    dsn = source_dsn(cfg, pre.info.version_num)
    by_oid = {t.oid: t for t in pre.tablespaces}
    objects: list[StoredObject] = []
    spaces: list[TablespaceEntry] = []
    with BaseBackupStream(
        dsn,
        label=f"gravl-dr {pre.backup_id}",
        slot=slot_name(pre.backup_id),
        inactivity_timeout=cfg.backup.inactivity_timeout_seconds,
        max_rate_kb=cfg.backup.max_rate_kb,
    ) as bb:
        bb.start()
        log.info("base backup of %s started at %s on timeline %d", safe_dsn(dsn), bb.start_lsn, bb.timeline)
        while (archive := bb.next_archive()) is not None:
            stem = archive.name
            if not re.fullmatch(r"(base|\d+)\.tar|backup_manifest", stem):
                raise PreconditionFailed(f"BASE_BACKUP sent an unexpected archive {stem!r}")
            name = _object_name(stem, pre.codec, pre.encrypted)
            objects.append(_store(cfg, repo, pre, name, bb.chunks()))
            if stem.endswith(".tar") and stem != "base.tar":
                oid = stem.removesuffix(".tar")
                known = by_oid.get(oid)
                spaces.append(
                    TablespaceEntry(
                        oid=oid,
                        name=known.name if known else oid,
                        location=archive.tablespace_path or (known.location if known else ""),
                        object=name,
                    )
                )
        end = bb.finish()
    base = [o for o in objects if o.key.startswith("base.tar")]
    if len(base) != 1:
        raise PreconditionFailed("BASE_BACKUP sent no base archive")
    # the main archive first: restore reads it as the backup's first object
    objects = [*base, *(o for o in objects if o not in base)]
    stop_time = datetime.now(UTC)
    dbnames = [d.name for d in inventory.databases_to_count(dsn)]
    # Every database's counts and newest timestamps, with the LSN they hold at: the drill pauses
    # its recovery just before it and compares them exactly. Then switch WAL so that the LSN
    # reaches the archive.
    facts = read_cluster_facts(
        dsn,
        explain_lock=lambda db: inventory.describe_lock_wait(with_dbname(dsn, db), db, "counting rows"),
        lock_timeout_seconds=cfg.backup.lock_timeout_seconds,
    )
    switch_wal(dsn)
    counts = {db: f.rows for db, f in facts.databases.items()}
    notes = inventory.not_carried_over(dsn, dbnames, data_directory=pre.info.data_directory)
    # what the backup holds of an unlogged table is its init fork: it restores empty (by design,
    # said in the restore report), so that is the count the drill must expect
    for db, tables in notes.unlogged_tables.items():
        for table in tables:  # "schema.table", as count_rows names them
            if table in counts.get(db, {}):
                counts[db][table] = 0
    if notes.config_outside_pgdata:
        config = _config_files(cfg, dsn, notes.config_outside_pgdata)
        if config is None:
            notes = notes.model_copy(
                update={
                    "backup_notes": [
                        "configuration files outside PGDATA could not be read (neither pg_read_file nor "
                        "postgres.config_dir): a restore writes a minimal postgresql.conf and pg_hba.conf"
                    ]
                }
            )
        else:
            objects.append(
                _store(cfg, repo, pre, _object_name(CONFIG_OBJECT, pre.codec, pre.encrypted), iter([config]))
            )
    return StreamResult(
        objects=tuple(objects),
        start_lsn=end.start_lsn,
        stop_lsn=end.stop_lsn,
        timeline=end.timeline,
        start_time=start_time,
        stop_time=stop_time,
        row_counts=counts,
        row_counts_exact=True,
        seconds=time.monotonic() - t0,
        tablespaces=tuple(spaces),
        not_carried_over=notes,
        facts=facts,
    )


CONFIG_OBJECT = "config.tar"


def _config_files(cfg: Config, dsn: str, paths: list[str]) -> bytes | None:
    """The server's configuration files that live outside PGDATA (Debian keeps them in
    /etc/postgresql/<version>/<cluster>), as a small tar of their base names: read through the
    server (pg_read_file: superuser or pg_read_server_files), else from postgres.config_dir."""
    import io
    import tarfile
    from pathlib import Path

    contents: dict[str, bytes] = {}
    for path in paths:
        data: bytes | None = None
        try:
            with connection(dsn) as conn:
                row = conn.execute("SELECT pg_read_binary_file(%s)", [path]).fetchone()
                data = bytes(row[0]) if row and row[0] is not None else None
        except (psycopg.Error, DRError) as exc:
            log.info("cannot read %s through the server (%s)", path, str(exc).strip().splitlines()[0])
        if data is None and cfg.postgres.config_dir:
            local = Path(cfg.postgres.config_dir) / Path(path).name
            if local.is_file():
                data = local.read_bytes()
        if data is None:
            return None
        contents[Path(path).name] = data
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in sorted(contents.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o600, int(time.time())
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _count_in_snapshot(dsn: str, snapshot: str, database: str, conns: list[Any]) -> tuple[DatabaseFacts, str]:
    """Exact row counts and newest timestamps in an exported snapshot (so they match what
    pg_dump saw), and that snapshot as pg_current_snapshot() text."""
    with connection(dsn, autocommit=False) as conn:
        conns.append(conn)
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
        row = conn.execute("SELECT pg_current_snapshot()::text").fetchone()
        try:
            facts = database_facts(conn)
        except psycopg.errors.LockNotAvailable:
            raise PreconditionFailed(inventory.describe_lock_wait(dsn, database, "counting rows")) from None
        except psycopg.errors.QueryCanceled as exc:
            raise PreconditionFailed(
                f"counting rows in database {database} took longer than "
                f"statement_timeout: {str(exc).strip().splitlines()[0]}"
            ) from None
        conn.rollback()
    return facts, str(row[0]) if row else ""


@dataclass
class _Running:
    """What a logical backup has started, so that an error or SIGTERM stops all of it at once."""

    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    conns: list[Any] = field(default_factory=list)
    stopped: threading.Event = field(default_factory=threading.Event)

    def stop(self) -> None:
        self.stopped.set()
        for proc in list(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        for conn in list(self.conns):
            with contextlib.suppress(Exception):
                conn.cancel_safe(timeout=2)


def _dump_failure(exc: CommandFailed, dsn: str, database: str) -> DRError:
    text = str(exc)
    if "lock" in text.lower() or "statement timeout" in text.lower():
        return PreconditionFailed(inventory.describe_lock_wait(dsn, database, "pg_dump"))
    return exc


def _stream_globals(cfg: Config, repo: Repository, pre: Preflight, running: _Running) -> StoredObject:
    dsn = source_dsn(cfg, pre.info.version_num)
    argv = [
        pg_bin("pg_dumpall", cfg.postgres.bindir),
        "--globals-only",
        "--no-password",
        "-l",
        pre.info.database,
        *([] if pre.info.is_superuser else ["--no-role-passwords"]),
    ]
    proc = popen(argv, env=client_env(dsn))
    running.procs.append(proc)
    source = ProcessSource(proc, "pg_dumpall --globals-only")
    try:
        return _store(cfg, repo, pre, _object_name("globals.sql", pre.codec, pre.encrypted), source)
    finally:
        source.finish()


def _dump_database(
    cfg: Config, repo: Repository, pre: Preflight, db: DatabaseEntry, running: _Running
) -> tuple[DatabaseEntry, StoredObject, tuple[DatabaseFacts, str]]:
    """pg_dump -Fc of one database in an exported snapshot; rows counted in the same snapshot
    on another connection while the dump streams (exact, and no extra wall time)."""
    dsn = with_dbname(source_dsn(cfg, pre.info.version_num), db.name)
    name = _object_name(f"db-{db.oid}.pgc", pre.codec, pre.encrypted)
    with connection(dsn, autocommit=False) as conn:
        running.conns.append(conn)
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        snap_row = conn.execute("SELECT pg_export_snapshot()").fetchone()
        assert snap_row is not None
        snapshot = str(snap_row[0])
        with ThreadPoolExecutor(1, thread_name_prefix="row-counts") as pool:
            counting = pool.submit(_count_in_snapshot, dsn, snapshot, db.name, running.conns)
            lock_ms = int(cfg.backup.lock_timeout_seconds * 1000)
            argv = [
                pg_bin("pg_dump", cfg.postgres.bindir),
                "-Fc",
                "-Z",
                "0",
                "--no-password",
                f"--snapshot={snapshot}",
                f"--lock-wait-timeout={lock_ms}",
            ]
            try:
                if running.stopped.is_set():
                    raise PreconditionFailed("backup stopped")
                proc = popen(argv, env=client_env(dsn))
                running.procs.append(proc)
                source = ProcessSource(proc, f"pg_dump of {db.name}")
                log.info("streaming pg_dump -Fc of database %s in snapshot %s", db.name, snapshot)
                try:
                    obj = _store(cfg, repo, pre, name, source)
                finally:
                    source.finish()
            except CommandFailed as exc:
                running.stop()
                raise _dump_failure(exc, dsn, db.name) from None
            except BaseException:
                running.stop()
                raise
            counts = counting.result()
        conn.rollback()
    return db.model_copy(update={"object": name}), obj, counts


def _stream_logical(cfg: Config, repo: Repository, pre: Preflight) -> StreamResult:
    """Globals (pg_dumpall --globals-only), then every chosen database (pg_dump -Fc each, its
    own object), ``backup.jobs`` at a time. Any failure or SIGTERM stops every dump at once."""
    t0 = time.monotonic()
    start_time = datetime.now(UTC)
    dsn = source_dsn(cfg, pre.info.version_num)
    with connection(dsn) as conn:
        lsn_row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        cluster_dbs = [
            str(r[0])
            for r in conn.execute(
                "SELECT datname FROM pg_database WHERE NOT datistemplate ORDER BY 1"
            ).fetchall()
        ]
    start_lsn = str(lsn_row[0]) if lsn_row else None
    running = _Running()
    entries: dict[str, DatabaseEntry] = {d.name: d for d in pre.databases}
    objects: list[StoredObject] = []
    counts: dict[str, dict[str, int]] = {}
    facts: dict[str, DatabaseFacts] = {}
    snapshots: dict[str, str] = {}
    pool = ThreadPoolExecutor(cfg.backup.jobs, thread_name_prefix="pg-dump")
    try:
        globals_obj = _stream_globals(cfg, repo, pre, running)
        objects.append(globals_obj)
        futures = [
            pool.submit(_dump_database, cfg, repo, pre, d, running) for d in pre.databases if not d.skipped
        ]
        for fut in futures:
            entry, obj, (db_facts, db_snapshot) = fut.result()
            entries[entry.name] = entry
            objects.append(obj)
            if not (entry.is_template and not db_facts.rows):  # the drill compares user databases
                counts[entry.name] = db_facts.rows
                facts[entry.name] = db_facts
                snapshots[entry.name] = db_snapshot
    except BaseException:
        running.stop()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    for db in pre.databases:
        if db.skipped:
            log.warning("database %s was not dumped: %s", db.name, db.skipped)
    notes = inventory.not_carried_over(
        dsn, [d.name for d in pre.databases if not d.skipped], data_directory=pre.info.data_directory
    )
    if not pre.info.is_superuser:
        notes = notes.model_copy(update={"backup_notes": [NO_PASSWORDS]})
    return StreamResult(
        objects=tuple(objects),
        start_lsn=start_lsn,
        stop_lsn=start_lsn,
        timeline=pre.info.timeline,
        start_time=start_time,
        stop_time=datetime.now(UTC),
        row_counts=counts,
        row_counts_exact=True,
        seconds=time.monotonic() - t0,
        tablespaces=pre.tablespaces,
        databases=tuple(entries[d.name] for d in pre.databases),
        globals_object=globals_obj.key,
        not_carried_over=notes,
        facts=ClusterFacts(
            lsn=start_lsn,
            snapshots=snapshots,
            databases=facts,
            not_counted={
                **{
                    db: "not in this backup (backup.databases does not name it)"
                    for db in cluster_dbs
                    if db not in entries
                },
                **{d.name: f"not in this backup: {d.skipped}" for d in pre.databases if d.skipped},
                **{
                    d.name: "dumped, not counted (a template database)"
                    for d in pre.databases
                    if not d.skipped and d.name not in facts
                },
            },
            all_databases=sorted({*cluster_dbs, *(d.name for d in pre.databases)}),
        ),
    )


def build_manifest(cfg: Config, pre: Preflight, res: StreamResult) -> Manifest:
    seg = pre.info.wal_segment_size
    start_wal = wal_file_name(res.timeline, parse_lsn(res.start_lsn), seg) if res.start_lsn else None
    stop_wal = None
    if res.stop_lsn and pre.kind == "physical":
        # the end point is the first byte after the backup's WAL: name the segment holding the
        # last byte needed (XLByteToPrevSeg in xlog_internal.h)
        stop_wal = wal_file_name(res.timeline, max(parse_lsn(res.stop_lsn) - 1, 0), seg)
    return Manifest(
        id=pre.backup_id,
        kind=pre.kind,  # type: ignore[arg-type]
        cluster=cfg.cluster,
        pg_version=pre.info.version_num,
        pg_version_text=pre.info.version_text,
        system_identifier=pre.info.system_identifier,
        timeline=res.timeline,
        start_lsn=res.start_lsn,
        stop_lsn=res.stop_lsn,
        start_wal=start_wal,
        stop_wal=stop_wal,
        wal_segment_size=seg,
        start_time=res.start_time,
        stop_time=res.stop_time,
        database=pre.info.database,
        codec=pre.codec,
        encryption=STREAM_ALG if pre.encrypted else "none",
        key_fingerprint=pre.key_fingerprint,
        objects=list(res.objects),
        row_counts=res.row_counts,
        row_counts_exact=res.row_counts_exact,
        data_checksums=pre.info.data_checksums,
        tablespaces=list(res.tablespaces),
        databases=list(res.databases),
        globals_object=res.globals_object,
        not_carried_over=res.not_carried_over,
        **_facts_fields(res.facts),
    )


def _facts_fields(facts: ClusterFacts | None) -> dict[str, Any]:
    """The manifest's record of the counts' snapshot: LSN, newest timestamps, unlogged tables and
    what could not be counted (a whole database under '*')."""
    if facts is None:
        return {}
    not_counted = {db: dict(f.not_counted) for db, f in facts.databases.items() if f.not_counted}
    for db, reason in facts.not_counted.items():
        not_counted.setdefault(db, {})["*"] = reason
    return {
        "row_counts_lsn": facts.lsn,
        "row_counts_snapshots": dict(facts.snapshots),
        "newest_timestamps": {db: dict(f.newest) for db, f in facts.databases.items() if f.newest},
        "unlogged_tables": {db: list(f.unlogged) for db, f in facts.databases.items() if f.unlogged},
        "not_counted": not_counted,
        "cluster_databases": list(facts.all_databases),
    }


# ---------------------------------------------------------------- verify and publish


def verify_objects(
    repo: Repository, manifest: Manifest, *, deep: bool = False, key: bytes | None = None
) -> VerifyResult:
    """Re-read every object: size and SHA-256 of stored bytes; with ``deep`` also decode it and
    check the raw size and SHA-256. Raises ChecksumMismatch naming the first bad object."""
    t0 = time.monotonic()
    total = 0
    for obj in manifest.objects:
        full = f"{backup_prefix(manifest.id)}/{obj.key}"
        what = f"backup {manifest.id} object {obj.key}"
        try:
            stored = verified(repo.iter_object(full), obj.sha256, obj.size, what)
        except NotFound:
            raise NotFound(f"{what} is missing from the repository") from None
        if deep:
            raw = decode(stored, manifest.codec, key, manifest.encryption != "none", what)
            consume(verified(raw, obj.raw_sha256, obj.raw_size, f"{what} (decoded)"))
        else:
            consume(stored)
        total += obj.size
    return VerifyResult(manifest.id, len(manifest.objects), total, time.monotonic() - t0, deep)


def key_for_manifest(cfg: Config, manifest: Manifest) -> bytes | None:
    """The client-side key a backup needs, checked against the fingerprint it was written with."""
    if manifest.encryption == "none":
        return None
    key = load_key(cfg.repository.encryption_key_env)
    if key is None:
        raise PreconditionFailed(
            f"backup {manifest.id} is encrypted: set repository.encryption_key_env to its key"
        )
    if manifest.key_fingerprint and key_fingerprint(key) != manifest.key_fingerprint:
        raise PreconditionFailed(f"backup {manifest.id} was encrypted with another key")
    return key


def publish_manifest(repo: Repository, manifest: Manifest) -> str:
    """Write the manifest: from this moment the backup exists."""
    key = manifest_key(manifest.id)
    put_commit_point(repo, key, manifest.to_json())
    return key


# ---------------------------------------------------------------- catalog

CatalogStatus = Literal["OK", "UNCHECKED", "INVALID", "BROKEN"]


@dataclass(frozen=True)
class CatalogEntry:
    """One backup folder with a manifest: OK / BROKEN after a check, UNCHECKED without one,
    INVALID when its manifest cannot be read (``manifest`` is then None)."""

    backup_id: str
    manifest_key: str
    manifest: Manifest | None
    status: CatalogStatus
    reason: str = ""


def check_objects(repo: Repository, manifest: Manifest) -> str | None:
    """The cheap check: every object present with the recorded size (no byte is read).
    Returns what is wrong, or None. Transient repository errors propagate."""
    if not manifest.objects:
        return "the manifest lists no object"
    for obj in manifest.objects:
        try:
            size = repo.size(f"{backup_prefix(manifest.id)}/{obj.key}")
        except NotFound:
            return f"object {obj.key} is missing"
        if size != obj.size:
            return f"object {obj.key} has {size} bytes, the manifest records {obj.size}"
    return None


def _id_time(backup_id: str) -> datetime:
    try:
        return backup_time(backup_id)
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)


def read_catalog(repo: Repository, cluster: str | None = None, *, check: bool = False) -> list[CatalogEntry]:
    """Every backup folder with a manifest, oldest first. An unreadable manifest is an INVALID
    entry with the reason (it never stops the listing); with ``check`` every backup gets the
    cheap object check (OK or BROKEN). Invalid entries are listed whatever ``cluster`` is."""
    entries: list[CatalogEntry] = []
    for key in repo.list_keys("backups"):
        if not key.endswith(f"/{MANIFEST_NAME}") or key.count("/") != 2:
            continue
        bid = key.split("/")[1]
        try:
            manifest = parse_manifest(repo.get_bytes(key), key)
        except NotFound:
            continue  # expired between the listing and the read
        except ChecksumMismatch as exc:
            entries.append(CatalogEntry(bid, key, None, "INVALID", one_line(exc)))
            continue
        if manifest.id != bid:
            entries.append(
                CatalogEntry(bid, key, None, "INVALID", f"{key}: the manifest names backup {manifest.id}")
            )
            continue
        if cluster is not None and manifest.cluster != cluster:
            continue
        status: CatalogStatus = "UNCHECKED"
        reason = ""
        if check:
            problem = check_objects(repo, manifest)
            status, reason = ("BROKEN", problem) if problem else ("OK", "")
        entries.append(CatalogEntry(bid, key, manifest, status, reason))
    return sorted(
        entries, key=lambda e: (e.manifest.stop_time if e.manifest else _id_time(e.backup_id), e.backup_id)
    )


def list_backups(repo: Repository, cluster: str | None = None, *, check: bool = False) -> list[Manifest]:
    """Complete backups (those with a readable manifest), oldest first. Invalid manifests are
    skipped with a warning; with ``check`` so are broken backups (objects missing or cut)."""
    manifests = []
    for e in read_catalog(repo, cluster, check=check):
        if e.manifest is None or e.status == "BROKEN":
            log.warning("skipping backup %s: %s (%s)", e.backup_id, e.status, e.reason)
            continue
        manifests.append(e.manifest)
    return manifests


def resolve_backup(
    repo: Repository,
    ref: str,
    *,
    kind: str | None = None,
    before: datetime | None = None,
    cluster: str | None = None,
) -> Manifest:
    """A backup by id, or 'latest' (optionally of a kind, ending before a time): the newest one
    whose objects are all there with their recorded sizes; broken ones are skipped, saying so."""
    if ref != "latest":
        try:
            data = repo.get_bytes(manifest_key(ref))
        except NotFound:
            raise NotFound(f"backup {ref} not found (no manifest in {repo.url})") from None
        return parse_manifest(data, manifest_key(ref))
    skipped: list[str] = []
    for e in reversed(read_catalog(repo, cluster)):
        m = e.manifest
        if m is None:
            log.warning("skipping backup %s: INVALID (%s)", e.backup_id, e.reason)
            skipped.append(f"{e.backup_id} INVALID")
            continue
        if (kind is not None and m.kind != kind) or (before is not None and m.stop_time > before):
            continue
        problem = check_objects(repo, m)
        if problem:
            log.warning("skipping backup %s: BROKEN (%s)", m.id, problem)
            skipped.append(f"{m.id} BROKEN")
            continue
        return m
    what = f"{kind} " if kind else ""
    when = f" ending before {before.isoformat()}" if before else ""
    extra = f" (skipped: {', '.join(skipped)})" if skipped else ""
    raise NotFound(f"no complete {what}backup{when} in {repo.url}{extra}")
