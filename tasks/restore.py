"""Adapter: restore steps as plain functions — verify first, then write, never a half-restored target.

Physical: one pass — each stored byte is read once, hashed (size and SHA-256) as it streams
through decompression into ``tar -x``; fetching, decompressing and extracting overlap (threads and
a process). Until the whole object verified, the target is not a valid data directory:
``global/pg_control`` is extracted under another name and only renamed into place once the
stored checksum matched and tar succeeded (as pgBackRest writes pg_control last), so no server
can start on unverified data; any failure empties the target again. Recovery settings (recovery.signal, restore_command, recovery_target_*) are
written by ``write_recovery_settings`` for point-in-time recovery.
Each tablespace of the backup is extracted the same way into its own directory (relocatable),
and ``pg_tblspc/<oid>`` re-pointed at it, as ``pg_basebackup -T`` does.
Logical: a dump is decoded into a temporary file (pg_restore -j needs a seekable file),
verified, then restored into an empty database; a whole-cluster backup restores the globals
first, then every database.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tasks.backup import key_for_manifest
from tasks.config import Config
from tasks.errors import ChecksumMismatch, CommandFailed, ConfigError, PreconditionFailed, command_error
from tasks.libpq import client_env, has_password
from tasks.models import Manifest, format_lsn
from tasks.pgcluster import chown_tree
from tasks.postgres import is_empty_database, safe_dsn, server_info
from tasks.proc import child_env, pg_bin, run, tail
from tasks.recovery import RecoveryTarget
from tasks.replay import ArchiveView
from tasks.repository import FileRepository, Repository
from tasks.streams import decode, sized, threaded, verified

log = logging.getLogger(__name__)

# where pg_control waits while the rest of the backup is extracted and verified
UNVERIFIED_CONTROL = "global/pg_control.gravl-unverified"


@dataclass(frozen=True)
class RestoreResult:
    backup_id: str
    target: str
    raw_bytes: int
    seconds: float
    verify_seconds: float
    skipped: tuple[str, ...] = ()  # what a lenient restore could not restore (roles the dump lacks)


_PG_RESTORE_ERROR = re.compile(
    r"pg_restore: error: could not execute query: ERROR:\s+(.*?)\n"
    r"(?:Command was: (.*?)(?:\n\n|\npg_restore|\Z))?",
    re.S,
)
_MISSING_ROLE = re.compile(r'role "[^"]+" does not exist')


def missing_role_errors(stderr: str) -> tuple[list[str], list[str]]:
    """pg_restore's failed statements split into those that only lack a role the dump does not
    carry (a single-database dump holds no roles) and every other error."""
    roles: list[str] = []
    other: list[str] = []
    for m in _PG_RESTORE_ERROR.finditer(stderr):
        message = m.group(1).strip().splitlines()[0]
        command = " ".join((m.group(2) or "").split())[:200]
        (roles if _MISSING_ROLE.search(message) else other).append(
            f"{message}: {command}" if command else message
        )
    return roles, other


def check_restore_request(pgdata: str | None, dsn: str | None, target: RecoveryTarget) -> None:
    """What a restore was asked for makes sense (pure): a data directory or a DSN, not both; no
    password in the DSN (a flow parameter is stored and shown); a recovery target only for a
    physical restore."""
    if (pgdata is None) == (dsn is None):
        raise PreconditionFailed("restore needs exactly one of --pgdata (physical) or --dsn (logical)")
    if dsn is None:
        return
    if has_password(dsn):
        # too late to keep it out of this run's parameters, but never used, logged or stored again
        raise ConfigError(
            "the dsn parameter carries a password: pass it through PGPASSWORD or a "
            ".pgpass file in the environment of the worker (the gravl-dr command "
            "does this by itself), never in a flow parameter"
        )
    if target.kind != "end":
        raise PreconditionFailed("a recovery target needs a physical restore (--pgdata)")


def check_archive_reaches(view: ArchiveView, manifest: Manifest, target: RecoveryTarget) -> None:
    """A recovery target must lie within what the WAL archive holds after the backup (pure)."""
    if target.kind != "end" and not view.has_wal_after_backup:
        raise PreconditionFailed(
            f"the WAL archive holds nothing after backup {manifest.id}: cannot reach {target.describe()}"
        )
    if target.kind == "lsn" and target.lsn is not None:
        end = max(view.newest_segment_start.values(), default=0) + manifest.wal_segment_size
        if target.lsn > end:
            raise PreconditionFailed(
                f"target LSN {target.value} is past the end of the archive (its newest "
                f"segment ends at {format_lsn(end)})"
            )


def check_pgdata_target(pgdata: Path) -> None:
    """The target must be absent or an empty directory: restore never mixes with existing data."""
    if pgdata.exists():
        if not pgdata.is_dir():
            raise PreconditionFailed(f"restore target {pgdata} exists and is not a directory")
        if any(pgdata.iterdir()):
            raise PreconditionFailed(f"restore target {pgdata} is not empty")
    elif not pgdata.parent.is_dir():
        raise PreconditionFailed(f"parent directory of restore target {pgdata} does not exist")


def _object_stream(
    repo: Repository, manifest: Manifest, key: bytes | None, index: int = 0, *, raw_hash: bool = True
) -> Iterator[bytes]:
    """The decoded bytes of one object, verified as they stream: stored size and SHA-256, then
    the raw size, and the raw SHA-256 unless ``raw_hash`` is off (the stored SHA-256 already
    pins every byte the deterministic decoder sees; `gravl-dr verify` checks the raw hash)."""
    obj = manifest.objects[index]
    what = f"backup {manifest.id} object {obj.key}"
    stored = verified(repo.iter_object(f"backups/{manifest.id}/{obj.key}"), obj.sha256, obj.size, what)
    raw = decode(stored, manifest.codec, key, manifest.encryption != "none", what)
    if not raw_hash:
        return sized(raw, obj.raw_size, f"{what} (decoded)")
    return verified(raw, obj.raw_sha256, obj.raw_size, f"{what} (decoded)")


def _empty_dir(path: Path) -> None:
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                child.unlink()


def parse_tablespace_map(items: str | list[str] | tuple[str, ...] | None) -> dict[str, str]:
    """``OLD=NEW`` pairs (as pg_basebackup -T): both absolute paths; a string holds one per line."""
    mapping: dict[str, str] = {}
    if isinstance(items, str):
        items = [line.strip() for line in items.splitlines() if line.strip()]
    for item in items or ():
        old, sep, new = item.partition("=")
        if not sep or not old or not new:
            raise PreconditionFailed(f"--tablespace-map {item!r}: expected OLD=NEW")
        if not (old.startswith("/") and new.startswith("/")):
            raise PreconditionFailed(f"--tablespace-map {item!r}: both directories must be absolute paths")
        mapping[old.rstrip("/") or "/"] = new.rstrip("/") or "/"
    return mapping


def restore_notes(manifest: Manifest) -> list[str]:
    """What the restored cluster lacks, or carries with a catch, compared with the source at
    backup time (pure: from the manifest)."""
    notes: list[str] = []
    nco = manifest.not_carried_over
    physical = manifest.kind == "physical"
    if physical and nco.unlogged_tables:
        tables = "; ".join(f"{db}: {', '.join(t)}" for db, t in sorted(nco.unlogged_tables.items()))
        notes.append(
            f"unlogged tables come back EMPTY (PostgreSQL resets them at the end of recovery): {tables}"
        )
    if nco.replication_slots:
        notes.append(
            "replication slots are not restored (a backup never carries them); recreate them "
            f"for the consumers that need them: {', '.join(nco.replication_slots)}"
        )
    if nco.prepared_transactions:
        if physical:
            notes.append(
                "prepared transactions were carried over and HOLD THEIR LOCKS until someone runs "
                "COMMIT PREPARED or ROLLBACK PREPARED: " + "; ".join(nco.prepared_transactions)
            )
        else:
            notes.append(
                "prepared transactions at backup time were not carried over (a dump holds committed "
                "data only): " + "; ".join(nco.prepared_transactions)
            )
    if physical and nco.config_outside_pgdata:
        notes.append(
            "configuration files lived outside PGDATA at backup time ("
            f"{', '.join(nco.config_outside_pgdata)}): the restored server uses the copies "
            "written into its data directory"
        )
    for db in manifest.databases:
        if db.skipped:
            notes.append(f"database {db.name} is NOT in this backup: {db.skipped}")
    notes.extend(nco.backup_notes)
    return notes


def relocate_tablespaces(manifest: Manifest, parent: Path) -> dict[str, str]:
    """A map sending every tablespace of a backup under ``parent`` (a drill's throwaway
    instance must not touch the source's tablespace directories on the same host)."""
    return {t.location.rstrip("/"): str(parent / f"tablespace-{t.oid}") for t in manifest.tablespaces}


def tablespace_targets(manifest: Manifest, mapping: dict[str, str]) -> dict[str, Path]:
    """Where each tablespace of a backup goes (oid -> directory): its recorded location unless
    remapped; every OLD of the map must name a tablespace of the backup."""
    known = {t.location.rstrip("/"): t for t in manifest.tablespaces}
    for old in mapping:
        if old not in known:
            raise PreconditionFailed(
                f"--tablespace-map: backup {manifest.id} has no tablespace at {old} "
                f"(it has: {', '.join(sorted(known)) or 'none'})"
            )
    targets = {t.oid: Path(mapping.get(t.location.rstrip("/"), t.location)) for t in manifest.tablespaces}
    for oid, path in targets.items():
        name = next(t.name for t in manifest.tablespaces if t.oid == oid)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise PreconditionFailed(
                f"tablespace {name} would be restored into {path}, which is not empty: "
                f"relocate it with --tablespace-map {path}=NEW_DIRECTORY"
            )
        if not path.exists() and not path.parent.is_dir():
            raise PreconditionFailed(f"tablespace {name}: parent directory of {path} does not exist")
    return targets


def _extract(
    repo: Repository,
    manifest: Manifest,
    key: bytes | None,
    index: int,
    dest: Path,
    *,
    hold_control: bool = False,
) -> int:
    """Stream one tar object into ``dest``, verified as it streams (tar runs as ourselves; the
    caller chowns). ``hold_control``: extract global/pg_control under UNVERIFIED_CONTROL."""
    hold = [f"--transform=s,^\\(\\./\\)\\?global/pg_control$,{UNVERIFIED_CONTROL},"] if hold_control else []
    # 1 MiB records and a 1 MiB pipe: tar reads and writes the files in large pieces instead
    # of 10 KiB ones (it reblocks short reads from a pipe by itself)
    tar = subprocess.Popen(
        [
            *("tar", "-x", "-b", "2048", "-f", "-", "-C", str(dest)),
            *("--no-same-owner", "--no-same-permissions", *hold),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=child_env(),
    )
    _widen_pipe(tar.stdin)
    # The stored SHA-256 pins every byte the deterministic decoder sees: hashing the
    # decoded data as well would only slow the RTO (`gravl-dr verify` checks it).
    raw_bytes, code, err = _pipe_into(
        tar,
        lambda: threaded(_object_stream(repo, manifest, key, index, raw_hash=False), depth=4, name="restore"),
        timeout=600,
    )
    if code != 0:
        raise command_error(f"tar exited {code} extracting {manifest.id}: {tail(err)}")
    return raw_bytes


def _widen_pipe(stream: object, size: int = 1 << 20) -> None:
    """Ask for a larger pipe buffer (Linux F_SETPIPE_SZ): fewer wake-ups between us and the
    child. Refused (an unprivileged limit) or not a pipe: the default buffer stays."""
    import fcntl

    fileno = getattr(stream, "fileno", None)
    if fileno is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        fcntl.fcntl(fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), size)


def _pipe_into(
    proc: subprocess.Popen[bytes], chunks: Callable[[], Iterable[bytes]], timeout: float
) -> tuple[int, int, bytes]:
    """Write what ``chunks()`` yields to ``proc``'s stdin, close it and wait: (bytes written, exit
    code, stderr). ``chunks`` is called inside the guard, so an error opening the source kills too.

    A process that exits early (broken pipe) is judged by its exit code; on any error of ours
    (a failed download, a checksum mismatch, a signal) the process is killed before re-raising."""
    written = 0
    try:
        assert proc.stdin is not None
        try:
            for chunk in chunks():
                proc.stdin.write(chunk)
                written += len(chunk)
        except BrokenPipeError:
            pass
        finally:
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
        code = proc.wait(timeout=timeout)
        err = proc.stderr.read() if proc.stderr else b""
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        if proc.stderr:
            proc.stderr.close()
    return written, code, err


def sync_filesystems(paths: Iterable[Path]) -> None:
    """Flush everything written under ``paths`` to disk: one syncfs(2) per filesystem (as
    pg_basebackup --sync-method=syncfs and PostgreSQL's recovery_init_sync_method=syncfs do),
    instead of an fsync per file. Before pg_control is put in place, so that after a power
    loss a restored directory is either complete on disk or not startable."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    seen: set[int] = set()
    for path in paths:
        st = os.stat(path)
        if st.st_dev in seen:
            continue
        seen.add(st.st_dev)
        fd = os.open(path, os.O_RDONLY)
        try:
            if libc.syncfs(fd) != 0:
                os.sync()  # syncfs refused (an old kernel or an odd filesystem): sync them all
        finally:
            os.close(fd)


@contextlib.contextmanager
def flushing_behind(paths: Callable[[], Iterable[Path]], pause: float = 0.05) -> Iterator[None]:
    """While the body writes, a thread keeps flushing the filesystems of ``paths()`` (syncfs in
    a loop), so the disk writes the restored files while later ones are still being decoded
    and extracted, as pgBackRest's per-file fsyncs overlap its other processes' work. The
    final ``sync_filesystems`` after the body is still what makes the restore durable; this
    only leaves it less to wait for. An error of the flusher is never the restore's: it is
    logged, and the final sync decides."""
    import threading

    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                sync_filesystems([p for p in paths() if p.exists()])
            except OSError as exc:
                log.debug("background flush: %s", exc)
            stop.wait(pause)

    thread = threading.Thread(target=loop, name="gravl-flush-behind", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=60)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _restore_tablespaces(
    cfg: Config,
    repo: Repository,
    manifest: Manifest,
    key: bytes | None,
    pgdata: Path,
    targets: dict[str, Path],
    made: list[tuple[Path, bool]],
) -> int:
    """Each tablespace's archive into its directory (appended to ``made`` for the clean-up),
    and ``pg_tblspc/<oid>`` pointed at it, as pg_basebackup -T does."""
    raw_bytes = 0
    index = {o.key: i for i, o in enumerate(manifest.objects)}
    for space in manifest.tablespaces:
        dest = targets[space.oid]
        made.append((dest, not dest.exists()))
        dest.mkdir(mode=0o700, exist_ok=True)
        if space.object is None or space.object not in index:
            raise PreconditionFailed(f"backup {manifest.id} lacks the archive of tablespace {space.name}")
        raw_bytes += _extract(repo, manifest, key, index[space.object], dest)
        chown_tree(dest, cfg.postgres.os_user)
        # base.tar carries pg_tblspc/<oid> -> the source's location; point it at ours
        link = pgdata / "pg_tblspc" / space.oid
        link.unlink(missing_ok=True)
        link.symlink_to(dest)
    return raw_bytes


def _restore_extras(repo: Repository, manifest: Manifest, key: bytes | None, pgdata: Path) -> int:
    """The configuration files kept outside PGDATA (or a minimal configuration), and the
    server's backup_manifest (for pg_verifybackup)."""
    raw_bytes = 0
    index = {o.key: i for i, o in enumerate(manifest.objects)}
    config_obj = next((o for o in manifest.objects if o.key.startswith("config.tar")), None)
    if config_obj is not None and not (pgdata / "postgresql.conf").exists():
        raw_bytes += _extract(repo, manifest, key, index[config_obj.key], pgdata)
        adapt_config(pgdata)
    elif not (pgdata / "postgresql.conf").exists():
        write_minimal_config(pgdata)
    manifest_obj = next((o for o in manifest.objects if o.key.startswith("backup_manifest")), None)
    if manifest_obj is not None:
        with open(pgdata / "backup_manifest", "wb") as out:
            for chunk in _object_stream(repo, manifest, key, index[manifest_obj.key]):
                out.write(chunk)
                raw_bytes += len(chunk)
    return raw_bytes


def restore_physical(
    cfg: Config,
    repo: Repository,
    manifest: Manifest,
    pgdata: Path,
    tablespace_map: dict[str, str] | None = None,
) -> RestoreResult:
    """Extract a physical backup into an empty ``pgdata`` owned by postgres.os_user, and each
    tablespace into its recorded location or where ``tablespace_map`` (OLD -> NEW) sends it."""
    if manifest.kind != "physical":
        raise PreconditionFailed(f"backup {manifest.id} is logical: restore it with --dsn")
    pgdata = pgdata.absolute()
    check_pgdata_target(pgdata)
    targets = tablespace_targets(manifest, tablespace_map or {})
    key = key_for_manifest(cfg, manifest)
    t0 = time.monotonic()
    created = not pgdata.exists()
    made: list[tuple[Path, bool]] = [(pgdata, created)]
    raw_bytes = 0
    try:
        pgdata.mkdir(mode=0o700, exist_ok=True)
        pgdata.chmod(0o700)
        with flushing_behind(lambda: [path for path, _ in made]):
            raw_bytes += _extract(repo, manifest, key, 0, pgdata, hold_control=True)
            raw_bytes += _restore_tablespaces(cfg, repo, manifest, key, pgdata, targets, made)
            raw_bytes += _restore_extras(repo, manifest, key, pgdata)
        # every stored byte verified and extracted, and on disk: now the directory may become valid
        sync_filesystems([path for path, _ in made])
        try:
            os.replace(pgdata / UNVERIFIED_CONTROL, pgdata / "global" / "pg_control")
        except FileNotFoundError:
            raise ChecksumMismatch(f"backup {manifest.id} holds no global/pg_control") from None
        _fsync_path(pgdata / "global" / "pg_control")
        _fsync_path(pgdata / "global")
    except BaseException:
        for path, was_created in made:
            if path.exists():
                _empty_dir(path)
                if was_created:
                    shutil.rmtree(path, ignore_errors=True)
        raise
    # pg_basebackup's tar leaves the server's own directories with its modes; the server
    # insists on 0700 for the data directory itself.
    pgdata.chmod(0o700)
    chown_tree(pgdata, cfg.postgres.os_user)
    # verification happens while extracting: no separate pass to report
    return RestoreResult(manifest.id, str(pgdata), raw_bytes, time.monotonic() - t0, 0.0)


# Settings in a copied postgresql.conf that point at the source's own files and directories
# (Debian: data_directory and hba_file under /var/lib and /etc/postgresql; conf.d includes).
_SOURCE_PATHS = (
    "data_directory",
    "hba_file",
    "ident_file",
    "external_pid_file",
    "include_dir",
    "include",
    "include_if_exists",
    "config_file",
)


def adapt_config(pgdata: Path) -> None:
    """Make the source's postgresql.conf (copied from outside its PGDATA) serve the restored
    data directory: settings naming the source's paths are commented out, so the server uses
    the pg_hba.conf / pg_ident.conf next to it and its own data directory."""
    conf = pgdata / "postgresql.conf"
    out = []
    for line in conf.read_text().splitlines():
        name = (
            line.strip().split("=", 1)[0].split()[0]
            if line.strip() and not line.lstrip().startswith("#")
            else ""
        )
        if name in _SOURCE_PATHS:
            out.append(f"# {line}  # commented out by gravl-dr restore: a path of the source")
        else:
            out.append(line)
    conf.write_text("\n".join(out) + "\n")


def write_minimal_config(pgdata: Path) -> None:
    """The backup holds no postgresql.conf (the source kept it outside PGDATA and it could not
    be read): write what a server needs to start, local connections only."""
    (pgdata / "postgresql.conf").write_text(
        "# written by gravl-dr restore: the source's configuration was not in the backup\n"
        "listen_addresses = 'localhost'\n"
    )
    (pgdata / "pg_hba.conf").write_text(
        "# written by gravl-dr restore\nlocal all all peer\nhost all all 127.0.0.1/32 scram-sha-256\n"
        "host all all ::1/128 scram-sha-256\n"
    )
    (pgdata / "pg_ident.conf").write_text("# written by gravl-dr restore\n")


def set_port(pgdata: Path, port: int, os_user: str) -> None:
    """Give a restored cluster its own port (the source's is likely taken on this host)."""
    auto = pgdata / "postgresql.auto.conf"
    with open(auto, "a") as fh:
        fh.write(f"\n# gravl-dr restore\nport = {port}\n")
    chown_tree(auto, os_user)


# A restored database may carry ALTER DATABASE ... SET default_transaction_read_only = on (a
# reporting database): pg_restore's own session must still write. Startup options outranks
# per-database and per-role settings (guc.c: PGC_S_CLIENT > PGC_S_DATABASE_USER).
# As a superuser, session_replication_role = replica also keeps the source's event triggers
# (ddl_command_end auditing, say) from firing on the restore's own DDL — pg_restore refreshes
# materialized views after creating them — so the restored audit tables equal the source's.
_RESTORE_OPTIONS = "-c default_transaction_read_only=off"
_SUPERUSER_OPTIONS = "-c session_replication_role=replica"


def restore_env(dsn: str, dbname: str | None = None, *, superuser: bool = False) -> dict[str, str]:
    env = client_env(dsn, dbname=dbname)
    extra = _RESTORE_OPTIONS + (" " + _SUPERUSER_OPTIONS if superuser else "")
    env["PGOPTIONS"] = f"{env.get('PGOPTIONS', '')} {extra}".strip()
    return env


def _spool(repo: Repository, manifest: Manifest, key: bytes | None, index: int) -> Path:
    """Decode and verify one dump into a temporary file (pg_restore -j needs a seekable file)."""
    fd, tmp_name = tempfile.mkstemp(prefix=f"gravl-restore-{os.getpid()}-", suffix=".pgc")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in threaded(_object_stream(repo, manifest, key, index), depth=4, name="restore"):
                out.write(chunk)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.chmod(0o644)  # pg_restore may run as another user than the one that spooled
    return tmp


def _database_object(manifest: Manifest, database: str | None) -> tuple[int, str | None]:
    """Index of the dump to restore: the named database of a cluster-wide backup (default: the
    database the backup's DSN named), or the only dump of a one-database backup."""
    if not manifest.databases:
        return 0, manifest.database
    name = database or manifest.database
    entry = next((d for d in manifest.databases if d.name == name), None)
    if entry is None:
        raise PreconditionFailed(
            f"backup {manifest.id} holds no database {name!r} (it has: "
            f"{', '.join(d.name for d in manifest.databases)})"
        )
    if entry.object is None:
        raise PreconditionFailed(f"backup {manifest.id} did not dump database {name}: {entry.skipped}")
    keys = [o.key for o in manifest.objects]
    if entry.object not in keys:
        raise PreconditionFailed(f"backup {manifest.id} lacks the dump of database {name}")
    return keys.index(entry.object), name


def restore_logical(
    cfg: Config,
    repo: Repository,
    manifest: Manifest,
    dsn: str,
    jobs: int = 2,
    *,
    no_owner: bool = False,
    database: str | None = None,
    skip_missing_roles: bool = False,
) -> RestoreResult:
    """One database of a logical backup into an existing, empty database (``dsn``): decoded and
    verified into a temporary file, then pg_restore -j. ``no_owner``: objects belong to the
    connecting role and no GRANTs are restored (for a target without the source's roles)."""
    if manifest.kind != "logical":
        raise PreconditionFailed(f"backup {manifest.id} is physical: restore it with --pgdata")
    index, _name = _database_object(manifest, database)
    if not is_empty_database(dsn):
        raise PreconditionFailed(f"target database {safe_dsn(dsn)} is not empty")
    key = key_for_manifest(cfg, manifest)
    t0 = time.monotonic()
    tmp = _spool(repo, manifest, key, index)
    try:
        verify_seconds = time.monotonic() - t0
        if skip_missing_roles:
            # A drill restores into a fresh instance without the source's roles: statements that
            # need one (policies TO role, user mappings) fail; they are reported, not hidden.
            proc = run(
                [
                    pg_bin("pg_restore", cfg.postgres.bindir),
                    "-j",
                    str(max(1, jobs)),
                    "--no-password",
                    "--no-owner",
                    "--no-privileges",
                    "--no-tablespaces",
                    "-d",
                    client_env(dsn).get("PGDATABASE", "postgres"),
                    str(tmp),
                ],
                timeout=24 * 3600,
                env=restore_env(dsn, superuser=server_info(dsn).is_superuser),
                check=False,
            )
            roles, other = missing_role_errors(proc.stderr)
            if proc.returncode != 0 and (other or not roles):
                detail = other[0] if other else tail(proc.stderr)
                raise command_error(f"pg_restore into {safe_dsn(dsn)} failed: {detail}")
            raw = sum(o.raw_size for o in manifest.objects)
            return RestoreResult(
                manifest.id, safe_dsn(dsn), raw, time.monotonic() - t0, verify_seconds, skipped=tuple(roles)
            )
        try:
            run(
                [
                    pg_bin("pg_restore", cfg.postgres.bindir),
                    "-j",
                    str(max(1, jobs)),
                    "--exit-on-error",
                    "--no-password",
                    *(["--no-owner", "--no-privileges"] if no_owner else []),
                    "-d",
                    client_env(dsn).get("PGDATABASE", "postgres"),
                    str(tmp),
                ],
                timeout=24 * 3600,
                env=restore_env(dsn, superuser=server_info(dsn).is_superuser),
            )
        except CommandFailed as exc:
            raise type(exc)(f"pg_restore into {safe_dsn(dsn)} failed: {exc}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    raw = manifest.objects[index].raw_size
    return RestoreResult(manifest.id, safe_dsn(dsn), raw, time.monotonic() - t0, verify_seconds)


@dataclass(frozen=True)
class ClusterRestoreResult:
    backup_id: str
    target: str
    raw_bytes: int
    seconds: float
    verify_seconds: float
    databases: tuple[str, ...]
    skipped: tuple[str, ...]  # "name: why" of databases the backup could not hold


_CREATE_TABLESPACE = re.compile(r"^(CREATE TABLESPACE .* LOCATION )'((?:[^']|'')*)';$")


def _map_globals_line(
    line: str, mapping: dict[str, str], existing_roles: frozenset[str] = frozenset()
) -> str:
    """pg_dumpall writes ``CREATE TABLESPACE name OWNER role LOCATION '/path';`` on one line:
    point it at the relocated directory. ``CREATE ROLE x;`` of a role the target already has
    (its bootstrap superuser) is dropped: the ALTER ROLE that follows gives it the source's
    attributes and password."""
    if line.startswith("CREATE ROLE ") and line.rstrip().endswith(";"):
        name = line.rstrip()[len("CREATE ROLE ") : -1]
        if name.startswith('"') and name.endswith('"'):
            name = name[1:-1].replace('""', '"')
        if name in existing_roles:
            return ""
    match = _CREATE_TABLESPACE.match(line.rstrip("\n"))
    if not match:
        return line
    old = match.group(2).replace("''", "'").rstrip("/")
    new = mapping.get(old, old)
    return f"{match.group(1)}'{new.replace(chr(39), chr(39) * 2)}';\n"


def _globals_lines(
    chunks: Iterator[bytes], mapping: dict[str, str], existing_roles: frozenset[str]
) -> Iterator[bytes]:
    rest = b""
    for chunk in chunks:
        rest += chunk
        *lines, rest = rest.split(b"\n")
        for raw in lines:
            yield _map_globals_line(raw.decode() + "\n", mapping, existing_roles).encode()
    if rest:
        yield _map_globals_line(rest.decode(), mapping, existing_roles).encode()


def check_fresh_cluster(dsn: str, manifest: Manifest) -> frozenset[str]:
    """A whole-cluster restore goes into a fresh cluster: none of the backup's databases may
    exist there (but postgres and template1, and those must hold no tables). Returns the roles
    the target already has."""
    from tasks.postgres import connection, user_tables, with_dbname

    with connection(dsn) as conn:
        existing = {r[0] for r in conn.execute("SELECT datname FROM pg_database")}
        roles = {r[0] for r in conn.execute("SELECT rolname FROM pg_roles WHERE rolname !~ '^pg_'")}
    clash = sorted(
        d.name
        for d in manifest.databases
        if d.object and d.name in existing and d.name not in ("postgres", "template1")
    )
    if clash:
        raise PreconditionFailed(
            f"target cluster {safe_dsn(dsn)} already has database(s) {', '.join(clash)}: restore the whole "
            "cluster into a fresh one, or one database with --database NAME"
        )
    for name in ("postgres", "template1"):
        if name in existing:
            with connection(with_dbname(dsn, name)) as conn:
                if user_tables(conn):
                    raise PreconditionFailed(f"target cluster {safe_dsn(dsn)}: database {name} is not empty")
    if len(roles) > 1:
        log.info(
            "target cluster already has roles %s: ALTER ROLE brings them to the source's settings",
            ", ".join(sorted(roles)),
        )
    return frozenset(roles)


def _prepare_tablespace_dirs(manifest: Manifest, mapping: dict[str, str], os_user: str) -> None:
    """CREATE TABLESPACE needs an empty directory the server owns: make it when it is local."""
    for space in manifest.tablespaces:
        path = Path(mapping.get(space.location.rstrip("/"), space.location))
        if path.exists():
            if path.is_dir() and any(path.iterdir()):
                raise PreconditionFailed(
                    f"tablespace {space.name} would be created in {path}, which is not empty: relocate "
                    f"it with --tablespace-map {space.location}=NEW_DIRECTORY"
                )
        elif path.parent.is_dir():
            path.mkdir(mode=0o700)
        else:
            continue  # a remote target: the operator prepares the directory
        chown_tree(path, os_user)


_TEMPORARY = re.compile(r"^gravl-restore-(?:stage-)?(\d+)-")


def sweep_stale_temporaries(tmpdir: Path) -> list[Path]:
    """Remove the staging directories and spooled dumps that a killed restore left in
    ``tmpdir`` (their names carry the restoring process's id; that process is gone): a staged
    backup is as large as the backup, and a kill -9 runs no clean-up. Returns what was removed."""
    removed: list[Path] = []
    for entry in tmpdir.iterdir():
        m = _TEMPORARY.match(entry.name)
        if m is None or _alive(int(m.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        log.info("removed %s, left by a restore that was killed", entry)
        removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stage_objects(
    repo: Repository, manifest: Manifest, indexes: list[int], jobs: int
) -> tuple[Path, FileRepository]:
    """Download each of the objects once into a private temporary directory (laid out like the
    repository), verifying stored size and SHA-256 as it streams: from S3 each stored byte is
    read once; nothing of the backup reaches the target until every object verified. Needs
    the stored (compressed) size of the objects in temporary space: checked first."""
    need = sum(manifest.objects[i].size for i in indexes)
    sweep_stale_temporaries(Path(tempfile.gettempdir()))
    staging = Path(tempfile.mkdtemp(prefix=f"gravl-restore-stage-{os.getpid()}-"))
    free = shutil.disk_usage(staging).free
    if free < need + (64 << 20):
        shutil.rmtree(staging, ignore_errors=True)
        raise PreconditionFailed(
            f"restoring backup {manifest.id} stages {need} bytes in {staging.parent}, which has "
            f"{free} free: point TMPDIR at a larger filesystem"
        )

    def fetch(index: int) -> None:
        obj = manifest.objects[index]
        key = f"backups/{manifest.id}/{obj.key}"
        dest = staging / key
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(dest, "xb") as out:
            for chunk in verified(
                repo.iter_object(key), obj.sha256, obj.size, f"backup {manifest.id} object {obj.key}"
            ):
                out.write(chunk)

    try:
        with ThreadPoolExecutor(max(1, jobs), thread_name_prefix="stage") as pool:
            for fut in [pool.submit(fetch, i) for i in indexes]:
                fut.result()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging, FileRepository(staging, f"file://{staging}")


def _restore_globals(
    cfg: Config,
    staged: Repository,
    manifest: Manifest,
    key: bytes | None,
    dsn: str,
    mapping: dict[str, str],
    existing_roles: frozenset[str],
) -> None:
    """Roles (with their password hashes), memberships, role settings and tablespaces, through
    psql into template1 (pg_dumpall's globals script: CREATE TABLESPACE cannot run in a
    transaction block, so the script's verification comes before it runs)."""
    assert manifest.globals_object is not None
    globals_index = [o.key for o in manifest.objects].index(manifest.globals_object)
    psql = subprocess.Popen(
        [
            pg_bin("psql", cfg.postgres.bindir),
            *("-X", "-q", "-v", "ON_ERROR_STOP=1", "--no-password", "-d", "template1", "-f", "-"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=child_env(restore_env(dsn, dbname="template1", superuser=True)),
    )
    _, code, err = _pipe_into(
        psql,
        lambda: _globals_lines(_object_stream(staged, manifest, key, globals_index), mapping, existing_roles),
        timeout=3600,
    )
    if code != 0:
        raise command_error(
            f"restoring the globals (roles, tablespaces) into {safe_dsn(dsn)} failed: {tail(err, 2)}"
        )
    log.info("restored globals of %s into %s", manifest.id, safe_dsn(dsn))


def _restore_database(
    cfg: Config, staged: Repository, manifest: Manifest, key: bytes | None, dsn: str, db_name: str, index: int
) -> int:
    """One database of a whole-cluster backup, created by pg_restore --create with its owner,
    encoding, locale, ACL, settings and comment (template1 is restored into as it is)."""
    tmp = _spool(staged, manifest, key, index)
    try:
        create = ["--create", "--clean", "--if-exists"] if db_name != "template1" else []
        run(
            [
                pg_bin("pg_restore", cfg.postgres.bindir),
                *("--exit-on-error", "--no-password", *create, "-d", "template1", str(tmp)),
            ],
            timeout=24 * 3600,
            env=restore_env(dsn, dbname="template1", superuser=True),
        )
    except CommandFailed as exc:
        raise type(exc)(f"pg_restore of database {db_name} into {safe_dsn(dsn)} failed: {exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    log.info("restored database %s", db_name)
    return manifest.objects[index].raw_size


def _check_cluster_backup(manifest: Manifest, mapping: dict[str, str]) -> None:
    if manifest.kind != "logical":
        raise PreconditionFailed(f"backup {manifest.id} is physical: restore it with --pgdata")
    if not manifest.databases or manifest.globals_object is None:
        raise PreconditionFailed(
            f"backup {manifest.id} holds one database only: restore it with "
            "--database into an existing empty database"
        )
    known = {t.location.rstrip("/") for t in manifest.tablespaces}
    for old in mapping:
        if old not in known:
            raise PreconditionFailed(f"--tablespace-map: backup {manifest.id} has no tablespace at {old}")


def restore_cluster(
    cfg: Config,
    repo: Repository,
    manifest: Manifest,
    dsn: str,
    jobs: int = 2,
    *,
    tablespace_map: dict[str, str] | None = None,
) -> ClusterRestoreResult:
    """A whole-cluster logical backup into a fresh cluster: the globals first (roles with their
    password hashes, memberships, role settings, tablespaces), then every dumped database,
    ``jobs`` at a time, each created by pg_restore --create with its owner, encoding, locale,
    ACL, settings and comment (postgres is dropped and re-created the same way).

    One pass over the repository: every object is downloaded once into local staging and
    verified there (``_stage_objects``) before anything touches the target, so a corrupt object
    fails the restore with the target as it was."""
    mapping = tablespace_map or {}
    _check_cluster_backup(manifest, mapping)
    existing_roles = check_fresh_cluster(dsn, manifest)
    key = key_for_manifest(cfg, manifest)
    t0 = time.monotonic()
    keys = [o.key for o in manifest.objects]
    dumped = [d for d in manifest.databases if d.object and d.object in keys]
    assert manifest.globals_object is not None
    wanted = [keys.index(manifest.globals_object), *(keys.index(str(d.object)) for d in dumped)]
    staging, staged = _stage_objects(repo, manifest, wanted, jobs)
    try:
        verify_seconds = time.monotonic() - t0
        _prepare_tablespace_dirs(manifest, mapping, cfg.postgres.os_user)
        _restore_globals(cfg, staged, manifest, key, dsn, mapping, existing_roles)
        raw = 0
        with ThreadPoolExecutor(max(1, jobs), thread_name_prefix="pg-restore") as pool:
            futures = [
                pool.submit(
                    _restore_database, cfg, staged, manifest, key, dsn, d.name, keys.index(str(d.object))
                )
                for d in dumped
            ]
            try:
                for fut in futures:
                    raw += fut.result()
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    skipped = tuple(f"{d.name}: {d.skipped}" for d in manifest.databases if not d.object)
    return ClusterRestoreResult(
        manifest.id,
        safe_dsn(dsn),
        raw,
        time.monotonic() - t0,
        verify_seconds,
        tuple(d.name for d in dumped),
        skipped,
    )


__all__ = [
    "ChecksumMismatch",
    "ClusterRestoreResult",
    "RestoreResult",
    "check_pgdata_target",
    "relocate_tablespaces",
    "restore_notes",
    "restore_cluster",
    "restore_logical",
    "restore_physical",
    "set_port",
]
