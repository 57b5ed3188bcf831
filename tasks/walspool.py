"""Adapter: the local WAL spool in ``pg_wal/gravl-dr/`` — archived and failed marks, locks and pid files, the settings cache, the prefetch folder.

pg_basebackup never copies pg_wal's contents, so the spool never travels with a backup (as
WAL-G does with ``pg_wal/walg_data``). ``archived/<name>.ok`` marks a file stored by a
look-ahead or background push (written only after the object is durable; it names the file's
inode, size and mtime, so a different file under the same name is pushed again);
``archived/<name>.err`` says why the background pusher could not push it; ``prefetch/<name>``
holds segments fetched ahead during recovery (written only after verification, see
``tasks.walserve``).

Marks need no fsync: one lost or torn in a crash reads as absent, and the file is then pushed
(or fetched) again — harmless. The ``wal-push`` fast path imports this module to answer for a
file already archived: it imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from tasks import walserve
from tasks.walnames import WAL_NAME_RE, parse_wal_name, segment_name

if TYPE_CHECKING:
    from tasks.config import RepositoryConfig
    from tasks.repository import Repository
    from tasks.walarchive import PushResult
    from tasks.walformat import WalSettings

log = logging.getLogger(__name__)

SPOOL_DIR = "gravl-dr"
PUSHER_LOCK = "pusher.lock"
PUSHER_LOG = "pusher.log"
PUSHER_PID = "pusher.pid"
PREFETCHER_LOCK = "prefetcher.lock"
PREFETCHER_LOG = "prefetcher.log"
PREFETCHER_PID = "prefetcher.pid"
WANT_FILE = "want"


def config_stamp(config_path: str | Path) -> str:
    """Identifies a config file's version: spool state is only trusted under the same one."""
    return walserve.config_stamp(str(config_path))


def file_stamp(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def spool_root(pg_wal: Path) -> Path:
    return pg_wal / SPOOL_DIR


def ensure_dir(folder: Path, like: Path) -> None:
    """mkdir -p; when root, new folders belong to the owner of ``like`` (pg_wal's owner), so
    the server's own later calls can use them."""
    missing = []
    probe = folder
    while not probe.exists() and probe != like and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0 and missing:
        st = like.stat()
        for d in missing:
            with contextlib.suppress(OSError):
                os.chown(d, st.st_uid, st.st_gid)


def atomic_write(path: Path, data: bytes, like: Path | None = None, durable: bool = True) -> None:
    """Write through a temporary name and rename (``durable``: fsync the file and its folder)."""
    like = like or path.parent
    ensure_dir(path.parent, like)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "xb") as fh:
        fh.write(data)
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
        if os.geteuid() == 0:
            st = like.stat()
            with contextlib.suppress(OSError):
                os.fchown(fh.fileno(), st.st_uid, st.st_gid)
    os.replace(tmp, path)
    if not durable:
        return
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def spool_writable(pg_wal: Path) -> bool:
    root = spool_root(pg_wal)
    try:
        ensure_dir(root / "archived", pg_wal)
    except OSError:
        return False
    return os.access(root / "archived", os.W_OK)


# ---------------------------------------------------------------- archived and failed marks


def mark_archived(path: Path, result: PushResult, stamp: str) -> None:
    """Record (after the object is durable) that this exact file is archived."""
    body = {"name": result.name, "key": result.key, "config": stamp, **file_stamp(path)}
    atomic_write(
        spool_root(path.parent) / "archived" / f"{result.name}.ok",
        json.dumps(body).encode(),
        like=path.parent,
        durable=False,
    )


def already_archived(path: Path, stamp: str) -> bool:
    """True when a look-ahead push stored this very file (same inode, size, mtime) under the
    same configuration. Cheap: no hashing, no repository round trip."""
    ok = spool_root(path.parent) / "archived" / f"{path.name}.ok"
    try:
        body = json.loads(ok.read_bytes())
        st = path.stat()
    except (OSError, ValueError):
        return False
    return (
        isinstance(body, dict)
        and body.get("config") == stamp
        and body.get("ino") == st.st_ino
        and body.get("size") == st.st_size
        and body.get("mtime_ns") == st.st_mtime_ns
    )


def failure_path(path: Path) -> Path:
    return spool_root(path.parent) / "archived" / f"{path.name}.err"


def mark_failed(path: Path, message: str) -> None:
    """Record why pushing this exact file failed; the waiting wal-push reports it."""
    try:
        body = {"name": path.name, "error": message, **file_stamp(path)}
    except OSError:
        return
    with contextlib.suppress(OSError):
        atomic_write(failure_path(path), json.dumps(body).encode(), like=path.parent, durable=False)


def take_failure(path: Path) -> str | None:
    """The pusher's failure for this very file, removed so that the next attempt retries it."""
    err = failure_path(path)
    try:
        body = json.loads(err.read_bytes())
        st = path.stat()
    except (OSError, ValueError):
        return None
    with contextlib.suppress(OSError):
        err.unlink()
    if isinstance(body, dict) and body.get("ino") == st.st_ino and body.get("mtime_ns") == st.st_mtime_ns:
        return str(body.get("error") or "push failed")
    return None


def failed_recently(path: Path) -> bool:
    return failure_path(path).exists()


def ready_files(pg_wal: Path) -> list[str]:
    """Names PostgreSQL has marked ready to archive, in its own order: timeline history files
    first, then the oldest (pgarch.c, pgarch_readyXlog)."""
    status = pg_wal / "archive_status"
    try:
        names = [n[: -len(".ready")] for n in os.listdir(status) if n.endswith(".ready")]
    except FileNotFoundError:
        return []
    names = [n for n in names if WAL_NAME_RE.match(n)]
    return sorted(names, key=lambda n: (not n.endswith(".history"), n))


def prune_spool(pg_wal: Path) -> int:
    """Forget .ok marks of files PostgreSQL has since recycled or removed."""
    folder = spool_root(pg_wal) / "archived"
    removed = 0
    try:
        entries = os.listdir(folder)
    except FileNotFoundError:
        return 0
    for entry in entries:
        path = folder / entry
        if entry.endswith(".tmp"):
            with contextlib.suppress(OSError):
                if time.time() - path.stat().st_mtime > 3600:
                    path.unlink()
            continue
        base = entry.rsplit(".", 1)[0]
        if entry.endswith((".ok", ".err")) and not (pg_wal / base).exists():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
    return removed


# ---------------------------------------------------------------- one background process per pg_wal


def take_lock(pg_wal: Path, name: str) -> int | None:
    """Take a one-process-per-pg_wal lock (released when the process exits); None if held."""
    import fcntl

    root = spool_root(pg_wal)
    ensure_dir(root, pg_wal)
    fd = os.open(root / name, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def write_pid(pg_wal: Path, name: str) -> None:
    atomic_write(spool_root(pg_wal) / name, str(os.getpid()).encode(), like=pg_wal, durable=False)


def _live_pid(pg_wal: Path, name: str) -> int | None:
    """The pid in the spool's pid file ``name`` when that process lives, else None."""
    try:
        pid = int((spool_root(pg_wal) / name).read_text().strip())
        os.kill(pid, 0)
    except PermissionError:
        return pid
    except (OSError, ValueError):
        return None
    return pid


def pusher_pid(pg_wal: Path) -> int | None:
    """The pid of the live pusher of this pg_wal, from its pid file, or None."""
    return _live_pid(pg_wal, PUSHER_PID)


def prefetcher_pid(pg_wal: Path) -> int | None:
    """The pid of the live prefetcher of this pg_wal, from its pid file, or None."""
    return _live_pid(pg_wal, PREFETCHER_PID)


def lock_held(pg_wal: Path, name: str) -> bool:
    """Whether some process holds the spool's lock ``name`` (taken and released at once if not)."""
    import fcntl

    try:
        fd = os.open(spool_root(pg_wal) / name, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # (closing releases a lock taken here)
    return False


def our_prefetcher(pg_wal: Path) -> int | None:
    """The pid of this pg_wal's live prefetcher when it is provably ours to stop: it holds the
    prefetcher lock and its command line is ``wal-fetch-daemon`` of this pg_wal (a stale pid
    file naming a reused pid never designates another process)."""
    pid = prefetcher_pid(pg_wal)
    if pid is None or not lock_held(pg_wal, PREFETCHER_LOCK):
        return None
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    wanted = {str(pg_wal).encode(), str(pg_wal.absolute()).encode()}
    return pid if b"wal-fetch-daemon" in argv and wanted & set(argv) else None


def prefetcher_activity(pg_wal: Path) -> str:
    """What the prefetcher says it is doing: the segment recovery last asked for, what it is
    fetching or holds, and the last line of its log (for a warning, never for a decision)."""
    folder = spool_root(pg_wal) / "prefetch"
    parts = []
    with contextlib.suppress(OSError):
        parts.append(f"recovery last asked for {(folder / WANT_FILE).read_text().strip()}")
    with contextlib.suppress(OSError, IndexError):
        held = (folder / "window").read_text().split()[1:]
        parts.append(f"fetching or holding {' '.join(held) if held else 'nothing'}")
    with contextlib.suppress(OSError, IndexError):
        with open(spool_root(pg_wal) / PREFETCHER_LOG, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 2000))
            lines = fh.read().decode(errors="replace").strip().splitlines()
        parts.append(f"its log's last line: {lines[-1].strip()[:300]}")
    return "; ".join(parts) or "no trace of its work"


# ---------------------------------------------------------------- settings cache (no pydantic on the hot path)


# what an S3 repository's client needs besides the url (tasks.config.RepositoryConfig's fields)
S3_FIELDS = (
    "endpoint_url",
    "region",
    "storage_class",
    "sse",
    "kms_key_id",
    "part_size_mb",
    "upload_concurrency",
)


@dataclass(frozen=True)
class CachedRepositoryConfig:
    """tasks.config.RepositoryConfig's fields, as validated under the cached config version:
    what S3Repository reads, without importing the config model (pydantic and every model of
    the config cost the background prefetcher's start, which PostgreSQL's first call waits for)."""

    url: str
    compression: str
    compression_level: int | None
    encryption_key_env: str | None
    endpoint_url: str | None = None
    region: str | None = None
    storage_class: str | None = None
    sse: str | None = None
    kms_key_id: str | None = None
    part_size_mb: int = 16
    upload_concurrency: int = 4


def save_settings_cache(pg_wal: Path, stamp: str, repo_cfg: Any) -> None:
    """Remember what a push or fetch needs from this config version, so the next calls skip
    loading the config model (pydantic costs more than the push itself). Holds no secret: the
    name of the key's environment variable, and for S3 the bucket's settings (the SDK finds the
    credentials in its environment)."""
    body: dict[str, Any] = {
        "config": stamp,
        "url": repo_cfg.url,
        "codec": repo_cfg.compression,
        "level": repo_cfg.compression_level,
        "key_env": repo_cfg.encryption_key_env,
    }
    if str(repo_cfg.url).startswith("s3://"):
        body["s3"] = {name: getattr(repo_cfg, name) for name in S3_FIELDS}
    elif not str(repo_cfg.url).startswith("file://"):
        return
    with contextlib.suppress(OSError):
        atomic_write(
            spool_root(pg_wal) / "settings.json", json.dumps(body).encode(), like=pg_wal, durable=False
        )


def load_settings_cache(pg_wal: Path, stamp: str) -> tuple[Repository, WalSettings] | None:
    """The repository and settings saved under this exact config version, or None."""
    try:
        body = json.loads((spool_root(pg_wal) / "settings.json").read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(body, dict) or body.get("config") != stamp:
        return None
    from urllib.parse import urlparse

    from tasks.streams import CODEC_SUFFIX, load_key
    from tasks.walformat import WalSettings

    url = str(body.get("url", ""))
    codec = body.get("codec")
    level = body.get("level")
    key_env = body.get("key_env")
    if codec not in CODEC_SUFFIX or not (key_env is None or isinstance(key_env, str)):
        return None
    settings = WalSettings(
        codec=str(codec),
        level=int(level) if isinstance(level, int) else None,
        key=load_key(key_env or None),
    )
    s3 = body.get("s3")
    if (
        url.startswith("s3://")
        and isinstance(s3, dict)
        and set(s3) == set(S3_FIELDS)
        and all(isinstance(s3[name], int) for name in ("part_size_mb", "upload_concurrency"))
        and all(s3[name] is None or isinstance(s3[name], str) for name in S3_FIELDS[:5])
    ):
        from tasks.repository import S3Repository

        try:
            cached = CachedRepositoryConfig(
                url=url,
                compression=str(codec),
                compression_level=settings.level,
                encryption_key_env=key_env,
                **s3,
            )
        except TypeError:
            return None
        # the same fields, read the same way: validated when this config version was loaded
        return S3Repository(cast("RepositoryConfig", cached)), settings
    path = urlparse(url).path
    if not url.startswith("file://") or not path.startswith("/"):
        return None
    from tasks.repository import FileRepository

    return FileRepository(Path(path), url), settings


# ---------------------------------------------------------------- the prefetch folder


def prefetch_dir(dest: Path) -> Path:
    return Path(walserve.prefetch_folder(str(dest)))


def note_wanted(dest: Path, name: str) -> None:
    """Tell the prefetcher which segment recovery asked for (it prefetches from the next)."""
    folder = prefetch_dir(dest)
    with contextlib.suppress(OSError):
        atomic_write(folder / WANT_FILE, name.encode(), like=folder.parent.parent, durable=False)


def prime_prefetch(
    pgdata: Path, start_wal: str, config_file: str | None = None, repo_cfg: Any = None
) -> None:
    """Before a restored server starts: tell the prefetcher to begin at the backup's first
    segment (``start_wal``), so it fetches ahead while recovery is still starting; with
    ``config_file`` and its ``repo_cfg``, leave the repository's settings for it (the
    prefetcher that PostgreSQL's first call starts then loads no config model)."""
    wal = parse_wal_name(start_wal)
    if wal.kind != "segment" or not wal.segno:
        return
    if config_file is not None and repo_cfg is not None:
        save_settings_cache(pgdata / "pg_wal", config_stamp(config_file), repo_cfg)
    note_wanted(pgdata / "pg_wal" / "RECOVERYXLOG", segment_name(wal.timeline, wal.segno - 1))


def prefetch_primed(dest: Path) -> bool:
    return (prefetch_dir(dest) / WANT_FILE).exists()


def take_prefetched(name: str, dest: Path, stamp: str, key: bytes | None) -> bool:
    """Move a prefetched segment into place when it passes the fast path's checks (see
    tasks.walserve) or, with no data directory to compare its header with, when its digest
    still matches the one verified at prefetch time. False when there is none to serve; a
    prefetched file that fails the checks is removed (the caller fetches from the repository)."""
    dest = dest.absolute()
    if walserve.serve(name, str(dest), stamp):
        return True
    found = walserve.check_prefetched(name, str(dest), stamp)
    folder = prefetch_dir(dest)
    if found == "no pg_control to compare the system identifier with":
        same = _same_digest_as_marked(folder, name, key)
        if same is None:
            return False
        if same:
            os.replace(folder / name, dest)
            with contextlib.suppress(FileNotFoundError):
                (folder / (name + walserve.MARK_SUFFIX)).unlink()
            return True
    if found != "not prefetched":
        log.warning("prefetched %s not served (%s): fetching it from the repository", name, found)
        for stale in (folder / name, folder / (name + walserve.MARK_SUFFIX)):
            with contextlib.suppress(OSError):
                stale.unlink()
    return False


def _same_digest_as_marked(folder: Path, name: str, key: bytes | None) -> bool | None:
    """Whether the prefetched file still hashes to the digest its mark recorded (False also when
    the mark names no digest this key can check); None when the file cannot be read."""
    from tasks.errors import DRError
    from tasks.walarchive import file_digest

    mark = walserve.read_mark(str(folder / (name + walserve.MARK_SUFFIX))) or {}
    alg = mark.get("alg")
    if alg not in ("sha256", "hmac-sha256") or (alg == "hmac-sha256" and key is None):
        return False
    try:
        digest, _size = file_digest(folder / name, key if alg == "hmac-sha256" else None)
    except DRError:
        return None
    return digest == mark.get("digest")
