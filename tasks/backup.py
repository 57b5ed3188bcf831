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
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from tasks.config import Config
from tasks.counts import ClusterFacts, read_cluster_facts, switch_wal
from tasks.errors import (
    AlreadyExists,
    ChecksumMismatch,
    DRError,
    Locked,
    NotFound,
    PreconditionFailed,
    one_line,
)
from tasks.libpq import client_env
from tasks.models import (
    BACKUP_ID_RE,
    Manifest,
    StoredObject,
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
    with connection(cfg.primary.dsn) as conn:
        row = conn.execute("SELECT sum(pg_database_size(oid))::bigint FROM pg_database").fetchone()
        db_row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
    database_bytes = int((row[0] if kind == "physical" else db_row[0]) or 0) if row and db_row else 0
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
    )


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
    return json.dumps({
        "backup_id": backup_id, "host": socket.gethostname(), "pid": os.getpid(),
        "started": datetime.now(UTC).isoformat(timespec="seconds"), "epoch": time.time(),
    }).encode()


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
                log.warning("could not release the backup lock of %s (%s); the next backup "
                            "takes it over, or run gravl-dr unlock", backup_id, one_line(exc))
                return False
            time.sleep(pause * (2 ** attempt))
    return False


def describe_lock(lock: dict[str, Any]) -> str:
    if lock.get("corrupt"):
        return "an unreadable lock"
    return (f"the lock of backup {lock.get('backup_id')} (host {lock.get('host')}, pid "
            f"{lock.get('pid')}, since {lock.get('started')})")


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
        raise PreconditionFailed(f"{what} belongs to a process that is running on this host; "
                                 "not removed (stop that backup first)")
    if not lock_is_stale(lock, repo) and not force:
        raise PreconditionFailed(f"{what} may belong to a running backup on another host; "
                                 "run unlock --force once you know it is dead")
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
    return len(keys)


_START_RE = re.compile(r"write-ahead log start point: ([0-9A-F]+/[0-9A-F]+) on timeline (\d+)")
_END_RE = re.compile(r"write-ahead log end point: ([0-9A-F]+/[0-9A-F]+)")


def _object_name(base: str, codec: str, encrypted: bool) -> str:
    return base + CODEC_SUFFIX[codec] + (ENC_SUFFIX if encrypted else "")


def _store(
    cfg: Config, repo: Repository, pre: Preflight, name: str, source: ProcessSource
) -> StoredObject:
    key = load_key(cfg.repository.encryption_key_env)
    stream, result = encode(source, pre.codec, key, cfg.repository.compression_level)
    put = repo.put_stream(f"{backup_prefix(pre.backup_id)}/{name}", stream)
    if put.size != result.stored.size or put.sha256 != result.stored.hexdigest():
        raise PreconditionFailed(f"{name}: repository recorded other bytes than were sent")
    return StoredObject(
        key=name, size=result.stored.size, sha256=result.stored.hexdigest(),
        raw_size=result.raw.size, raw_sha256=result.raw.hexdigest(),
    )


def stream_backup(cfg: Config, repo: Repository, pre: Preflight) -> StreamResult:
    """Run the backup program and stream its output into the repository in one pass."""
    removed = discard_incomplete(repo, pre.backup_id)
    if removed:
        log.info("removed %d object(s) of an earlier failed attempt of %s", removed, pre.backup_id)
    if pre.kind == "physical":
        return _stream_physical(cfg, repo, pre)
    return _stream_logical(cfg, repo, pre)


def _stream_physical(cfg: Config, repo: Repository, pre: Preflight) -> StreamResult:
    t0 = time.monotonic()
    start_time = datetime.now(UTC)
    argv = [pg_bin("pg_basebackup", cfg.postgres.bindir), "-D", "-", "-Ft", "-X", "fetch",
            "-c", "fast", "-v", "--no-password"]
    proc = popen(argv, env=client_env(cfg.primary.dsn))
    source = ProcessSource(proc, "pg_basebackup")
    log.info("streaming pg_basebackup of %s as tar (WAL included)", safe_dsn(cfg.primary.dsn))
    try:
        obj = _store(cfg, repo, pre, _object_name("base.tar", pre.codec, pre.encrypted), source)
    finally:
        source.finish()
    stderr = source.stderr_text()
    start = _START_RE.search(stderr)
    end = _END_RE.search(stderr)
    if not start or not end:
        raise PreconditionFailed("pg_basebackup did not report its WAL start and end points")
    stop_time = datetime.now(UTC)
    # Every database's counts in one snapshot, with the LSN they hold at: the drill pauses its
    # recovery there and compares them exactly. Then switch WAL so that LSN reaches the archive.
    facts = read_cluster_facts(cfg.primary.dsn)
    switch_wal(cfg.primary.dsn)
    return StreamResult(
        objects=(obj,), start_lsn=start.group(1), stop_lsn=end.group(1),
        timeline=int(start.group(2)), start_time=start_time, stop_time=stop_time,
        row_counts={db: f.rows for db, f in facts.databases.items()}, row_counts_exact=True,
        seconds=time.monotonic() - t0, facts=facts,
    )


def _stream_logical(cfg: Config, repo: Repository, pre: Preflight) -> StreamResult:
    """pg_dump -Fc in an exported snapshot; rows are counted in the same snapshot, on another
    connection while the dump streams, so the counts are exact and cost no extra wall time."""
    t0 = time.monotonic()
    start_time = datetime.now(UTC)
    with connection(cfg.primary.dsn, autocommit=False) as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        snap_row = conn.execute("SELECT pg_export_snapshot(), pg_current_wal_lsn()::text").fetchone()
        assert snap_row is not None
        snapshot, start_lsn = str(snap_row[0]), str(snap_row[1])
        dbname = conn.info.dbname
        with ThreadPoolExecutor(1, thread_name_prefix="row-counts") as pool:
            counting = pool.submit(read_cluster_facts, cfg.primary.dsn, snapshot_id=snapshot, lsn=start_lsn,
                                   only=[str(dbname)])
            argv = [pg_bin("pg_dump", cfg.postgres.bindir), "-Fc", "-Z", "0", "--no-password",
                    f"--snapshot={snapshot}"]
            proc = popen(argv, env=client_env(cfg.primary.dsn))
            source = ProcessSource(proc, "pg_dump")
            log.info("streaming pg_dump -Fc of %s in snapshot %s", safe_dsn(cfg.primary.dsn), snapshot)
            try:
                obj = _store(cfg, repo, pre, _object_name("dump.pgc", pre.codec, pre.encrypted), source)
            finally:
                source.finish()
            facts = counting.result()
        conn.rollback()
    return StreamResult(
        objects=(obj,), start_lsn=start_lsn, stop_lsn=start_lsn, timeline=pre.info.timeline,
        start_time=start_time, stop_time=datetime.now(UTC),
        row_counts={db: f.rows for db, f in facts.databases.items()},
        row_counts_exact=True, seconds=time.monotonic() - t0, facts=facts,
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
        id=pre.backup_id, kind=pre.kind, cluster=cfg.cluster,  # type: ignore[arg-type]
        pg_version=pre.info.version_num, pg_version_text=pre.info.version_text,
        system_identifier=pre.info.system_identifier, timeline=res.timeline,
        start_lsn=res.start_lsn, stop_lsn=res.stop_lsn, start_wal=start_wal, stop_wal=stop_wal,
        wal_segment_size=seg, start_time=res.start_time, stop_time=res.stop_time,
        database=pre.info.database, codec=pre.codec,
        encryption=STREAM_ALG if pre.encrypted else "none", key_fingerprint=pre.key_fingerprint,
        objects=list(res.objects), row_counts=res.row_counts, row_counts_exact=res.row_counts_exact,
        data_checksums=pre.info.data_checksums, **_facts_fields(res.facts),
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
        "row_counts_lsn": facts.lsn, "row_counts_snapshots": dict(facts.snapshots),
        "newest_timestamps": {db: dict(f.newest) for db, f in facts.databases.items() if f.newest},
        "unlogged_tables": {db: list(f.unlogged) for db, f in facts.databases.items() if f.unlogged},
        "not_counted": not_counted, "cluster_databases": list(facts.all_databases),
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
            entries.append(CatalogEntry(bid, key, None, "INVALID",
                                        f"{key}: the manifest names backup {manifest.id}"))
            continue
        if cluster is not None and manifest.cluster != cluster:
            continue
        status: CatalogStatus = "UNCHECKED"
        reason = ""
        if check:
            problem = check_objects(repo, manifest)
            status, reason = ("BROKEN", problem) if problem else ("OK", "")
        entries.append(CatalogEntry(bid, key, manifest, status, reason))
    return sorted(entries, key=lambda e: (e.manifest.stop_time if e.manifest else _id_time(e.backup_id),
                                          e.backup_id))


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
    repo: Repository, ref: str, *, kind: str | None = None, before: datetime | None = None,
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

