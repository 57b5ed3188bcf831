"""Adapter: archiving and fetching WAL files (``wal-push`` / ``wal-fetch``), with look-ahead and prefetch.

No Prefect import and, for file repositories, no boto3 import: PostgreSQL runs these once per
16 MB segment. An archived file is one object ``wal/<timeline>/<name><codec suffix>[.enc]``:
a zstd *skippable frame* (magic 0x184D2A5E, ignored by ``zstd -d`` and ``lz4 -d``) holding a
small JSON header with the raw size and SHA-256 (HMAC-SHA-256 when encrypted), followed by the
compressed (and encrypted) payload. The checksum travels with the data, so there is no second
object to keep in step, and fetch verifies every byte before PostgreSQL sees it.

Local state lives in ``pg_wal/gravl-dr/`` (pg_basebackup never copies pg_wal's contents, as
WAL-G does with ``pg_wal/walg_data``): ``archived/<name>.ok`` marks a file stored by a
look-ahead push (written only after the object is durable; it names the file's inode, size and
mtime, so a different file under the same name is pushed again), ``prefetch/<name>`` holds
segments fetched ahead during recovery (written only after verification).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import struct
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tasks import walserve
from tasks.errors import (
    AlreadyExists,
    ChecksumMismatch,
    DRError,
    NotFound,
    PermanentError,
    PreconditionFailed,
    StorageUnavailable,
)
from tasks.streams import CODEC_SUFFIX, ENC_SUFFIX

# WAL names live in tasks.walnames; these stay importable from here (re-exported).
from tasks.walnames import SEGMENT_SIZE as SEGMENT_SIZE
from tasks.walnames import WAL_NAME_RE as WAL_NAME_RE
from tasks.walnames import WalKind as WalKind
from tasks.walnames import WalName as WalName
from tasks.walnames import parse_wal_name as parse_wal_name
from tasks.walnames import segment_name as segment_name

if TYPE_CHECKING:
    from tasks.repository import Repository

log = logging.getLogger(__name__)

READ_CHUNK = 4 * 1024 * 1024
HEADER_MAGIC = struct.pack("<I", 0x184D2A5E)  # a zstd/lz4 skippable frame
HEADER_FORMAT = "gravl-wal/1"
MAX_HEADER = 64 * 1024
SPOOL_DIR = "gravl-dr"


class WalConflict(PermanentError):
    """A file of that name is archived already with different content; the stored copy is kept."""


class WalMissing(NotFound):
    """The archive has no file of that name (PostgreSQL reads this as the end of the archive)."""


class WalVanished(StorageUnavailable):
    """The archive listed the file, then could not return it (removed meanwhile by a concurrent
    expire, or a store not yet consistent): not the end of the archive, recovery must stop."""


def object_key(name: str, codec: str, encrypted: bool) -> str:
    wal = parse_wal_name(name)
    return f"{wal.folder}/{name}{CODEC_SUFFIX[codec]}{ENC_SUFFIX if encrypted else ''}"


def key_variants(name: str, codec: str, encrypted: bool) -> list[str]:
    """Keys a file may be stored under: the configured codec first, then the others (a
    repository keeps files pushed under an earlier configuration)."""
    keys = [object_key(name, codec, encrypted)]
    for enc in (encrypted, not encrypted):
        for other in ("zstd", "lz4", "gzip", "none"):
            key = object_key(name, other, enc)
            if key not in keys:
                keys.append(key)
    return keys


def name_of_key(key: str) -> str | None:
    """The WAL file name an object key holds, or None for anything else."""
    base = key.rsplit("/", 1)[-1]
    if base.endswith(ENC_SUFFIX):
        base = base[: -len(ENC_SUFFIX)]
    for suffix in (".zst", ".lz4", ".gz"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base if WAL_NAME_RE.match(base) else None


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class WalSettings:
    """What push and fetch need from the configuration."""

    codec: str = "zstd"
    level: int | None = None
    key: bytes | None = None

    @property
    def encrypted(self) -> bool:
        return self.key is not None

    @classmethod
    def from_config(cls, repo_cfg: Any) -> WalSettings:
        from tasks.streams import load_key

        return cls(
            codec=repo_cfg.compression,
            level=repo_cfg.compression_level,
            key=load_key(repo_cfg.encryption_key_env),
        )


# ---------------------------------------------------------------- digests and the header


class _RawDigest:
    """SHA-256 of the raw bytes, or HMAC-SHA-256 under the encryption key (a plain hash of
    plaintext WAL next to its ciphertext would let anyone confirm a guess of the content)."""

    def __init__(self, key: bytes | None) -> None:
        self.alg = "hmac-sha256" if key else "sha256"
        self._h: Any = hmac.new(key, digestmod=hashlib.sha256) if key else hashlib.sha256()
        self.size = 0

    def update(self, chunk: bytes) -> None:
        self._h.update(chunk)
        self.size += len(chunk)

    def hexdigest(self) -> str:
        return str(self._h.hexdigest())


def _read_file(path: Path) -> Iterator[bytes]:
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        raise PreconditionFailed(f"WAL file {path} does not exist") from None
    except OSError as exc:
        raise PreconditionFailed(f"cannot read WAL file {path}: {exc.strerror}") from None
    with fh:
        while chunk := fh.read(READ_CHUNK):
            yield chunk


def file_digest(path: Path, key: bytes | None) -> tuple[str, int]:
    d = _RawDigest(key)
    for chunk in _read_file(path):
        d.update(chunk)
    return d.hexdigest(), d.size


def build_header(name: str, settings: WalSettings, digest: str, size: int) -> bytes:
    from tasks.streams import STREAM_ALG, key_fingerprint

    body = {
        "format": HEADER_FORMAT,
        "name": name,
        "codec": settings.codec,
        "encryption": STREAM_ALG if settings.key else "none",
        "raw_size": size,
        "digest_alg": "hmac-sha256" if settings.key else "sha256",
        "digest": digest,
    }
    if settings.key:
        body["key_fingerprint"] = key_fingerprint(settings.key)
    data = json.dumps(body, separators=(",", ":")).encode()
    return HEADER_MAGIC + struct.pack("<I", len(data)) + data


@dataclass(frozen=True)
class WalHeader:
    name: str
    codec: str
    encryption: str
    raw_size: int
    digest_alg: str
    digest: str
    key_fingerprint: str | None = None


def split_header(chunks: Iterable[bytes], what: str) -> tuple[WalHeader, Iterator[bytes]]:
    """Read the header frame off an object's chunks; return it and the payload's chunks."""
    it = iter(chunks)
    buf = b""
    need = 8
    for chunk in it:
        buf += chunk
        if len(buf) >= 8:
            if buf[:4] != HEADER_MAGIC:
                raise ChecksumMismatch(f"{what}: not a gravl-dr WAL object (no header)")
            length = struct.unpack("<I", buf[4:8])[0]
            if length > MAX_HEADER:
                raise ChecksumMismatch(f"{what}: header of {length} bytes is corrupt")
            need = 8 + length
        if len(buf) >= need and need > 8:
            break
    if len(buf) < need or need <= 8:
        raise ChecksumMismatch(f"{what}: truncated object (header incomplete)")
    try:
        doc = json.loads(buf[8:need])
        if doc.get("format") != HEADER_FORMAT:
            raise ValueError(doc.get("format"))
        header = WalHeader(
            name=str(doc["name"]),
            codec=str(doc["codec"]),
            encryption=str(doc["encryption"]),
            raw_size=int(doc["raw_size"]),
            digest_alg=str(doc["digest_alg"]),
            digest=str(doc["digest"]),
            key_fingerprint=doc.get("key_fingerprint"),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ChecksumMismatch(f"{what}: header is corrupt") from None
    if header.codec not in CODEC_SUFFIX:
        raise ChecksumMismatch(f"{what}: header names unknown codec {header.codec!r}")
    rest = buf[need:]

    def payload() -> Iterator[bytes]:
        if rest:
            yield rest
        yield from it

    return header, payload()


def decode_object(
    chunks: Iterable[bytes], settings: WalSettings, what: str
) -> tuple[WalHeader, Iterator[bytes]]:
    """Header plus the raw bytes; the iterator raises ChecksumMismatch at the end unless the
    size and digest match the header (callers must consume it fully before trusting it)."""
    from tasks.streams import decompress, decrypt, key_fingerprint

    header, payload = split_header(chunks, what)
    stage: Iterable[bytes] = payload
    if header.encryption != "none":
        if settings.key is None:
            raise PreconditionFailed(f"{what} is encrypted: set repository.encryption_key_env")
        if header.key_fingerprint and header.key_fingerprint != key_fingerprint(settings.key):
            raise PreconditionFailed(f"{what} was encrypted with another key")
        stage = decrypt(stage, settings.key, what)
    stage = decompress(stage, header.codec, what)
    key = settings.key if header.digest_alg == "hmac-sha256" else None
    if header.digest_alg == "hmac-sha256" and key is None:
        raise PreconditionFailed(f"{what} is keyed: set repository.encryption_key_env")

    def checked() -> Iterator[bytes]:
        d = _RawDigest(key)
        for chunk in stage:
            d.update(chunk)
            if d.size > header.raw_size:
                raise ChecksumMismatch(
                    f"{what}: checksum mismatch, longer than the {header.raw_size} bytes recorded "
                    "(stored data is corrupt)"
                )
            yield chunk
        if d.size != header.raw_size:
            raise ChecksumMismatch(
                f"{what}: checksum mismatch, {d.size} bytes where the header says {header.raw_size} "
                "(stored data is corrupt)"
            )
        if not hmac.compare_digest(d.hexdigest(), header.digest):
            raise ChecksumMismatch(f"{what}: checksum mismatch (stored data is corrupt)")

    return header, checked()


def _encoded(path: Path, name: str, settings: WalSettings, digest: str, size: int) -> Iterator[bytes]:
    """Header, then the file compressed (and encrypted). The file is hashed again on the way:
    if it changed since the header was built, the stream fails before its last chunk, so the
    repository never commits an object whose header lies."""
    from tasks.streams import compress, encrypt

    check = _RawDigest(settings.key)

    def source() -> Iterator[bytes]:
        for chunk in _read_file(path):
            check.update(chunk)
            yield chunk
        if check.size != size or check.hexdigest() != digest:
            raise PreconditionFailed(f"WAL file {name} changed while it was being archived")

    yield build_header(name, settings, digest, size)
    stage: Iterable[bytes] = compress(source(), settings.codec, settings.level)
    if settings.key:
        stage = encrypt(stage, settings.key)
    yield from stage


# ---------------------------------------------------------------- finding objects


def find_object(repo: Repository, name: str, settings: WalSettings) -> str | None:
    """The key under which ``name`` is archived, or None. One request in the usual case (the
    configured codec); on S3 a miss costs one prefix listing, not a probe per codec."""
    variants = key_variants(name, settings.codec, settings.encrypted)
    if repo.exists(variants[0]):
        return variants[0]
    found = _stored_names(repo, name)
    if found is None:
        for key in variants[1:]:
            if repo.exists(key):
                return key
        return None
    for key in variants[1:]:
        if key.rsplit("/", 1)[-1] in found:
            return key
    return None


def find_variants(repo: Repository, name: str) -> list[str]:
    """Every key under which ``name`` is archived, whatever codec or encryption it was pushed
    with (one listing on S3, a stat per variant on a file repository)."""
    variants = key_variants(name, "zstd", False)
    found = _stored_names(repo, name)
    if found is None:
        return [key for key in variants if repo.exists(key)]
    return [key for key in variants if key.rsplit("/", 1)[-1] in found]


def _stored_names(repo: Repository, name: str) -> set[str] | None:
    """Base names of the objects whose key starts with ``name``'s, from one listing where the
    repository can list by a name prefix (S3); None where it cannot (a file repository)."""
    lister = getattr(repo, "keys_starting_with", None)
    if lister is None:
        return None
    keys: list[str] = lister(f"{parse_wal_name(name).folder}/{name}", 50)
    return {key.rsplit("/", 1)[-1] for key in keys}


def list_archive(repo: Repository, keys: list[str] | None = None) -> dict[str, str]:
    """Every archived WAL file: name -> key (``keys``: a listing of ``wal`` already made)."""
    found: dict[str, str] = {}
    for key in repo.list_keys("wal") if keys is None else keys:
        name = name_of_key(key)
        if name is not None and name not in found:
            found[name] = key
    return found


def duplicate_variants(keys: list[str]) -> dict[str, list[str]]:
    """Names archived under more than one codec or encryption variant (left by releases before
    wal-push compared across variants): wal-fetch could return either copy."""
    by_name: dict[str, list[str]] = {}
    for key in keys:
        name = name_of_key(key)
        if name is not None:
            by_name.setdefault(name, []).append(key)
    return {name: found for name, found in by_name.items() if len(found) > 1}


# ---------------------------------------------------------------- push


@dataclass(frozen=True)
class PushResult:
    name: str
    key: str
    outcome: Literal["stored", "duplicate", "spooled"]
    raw_size: int
    stored_size: int
    seconds: float


IN_MEMORY_LIMIT = 64 * 1024 * 1024  # files up to this size are read once, hashed and compressed in memory


def _compress_bytes(data: bytes, settings: WalSettings) -> bytes:
    """One-shot compression of a whole file (single-threaded: the look-ahead already runs
    several files at once, and zstd's worker threads cost more than they give on 16 MB)."""
    if settings.codec == "zstd":
        import zstandard

        out = zstandard.ZstdCompressor(level=settings.level or 3, threads=0).compress(data)
    elif settings.codec == "lz4":
        import lz4.frame

        out = lz4.frame.compress(data, compression_level=settings.level or 0)
    elif settings.codec == "gzip":
        import zlib

        comp = zlib.compressobj(settings.level or 6, zlib.DEFLATED, 31)
        out = comp.compress(data) + comp.flush()
    else:
        out = data
    if settings.key is not None:
        from tasks.streams import encrypt

        out = b"".join(encrypt([out], settings.key))
    return out


def push_file(repo: Repository, path: Path, settings: WalSettings) -> PushResult:
    """Archive one WAL file: durable on success, never overwriting. The same content already
    archived is a success ("duplicate"); different content raises WalConflict."""
    t0 = time.monotonic()
    name = path.name
    parse_wal_name(name)
    data: bytes | None = None
    try:
        if path.stat().st_size <= IN_MEMORY_LIMIT:
            data = path.read_bytes()
    except FileNotFoundError:
        raise PreconditionFailed(f"WAL file {path} does not exist") from None
    except OSError as exc:
        raise PreconditionFailed(f"cannot read WAL file {path}: {exc.strerror}") from None
    if data is not None:
        d = _RawDigest(settings.key)
        d.update(data)
        digest, size = d.hexdigest(), d.size
    else:
        digest, size = file_digest(path, settings.key)
    key = object_key(name, settings.codec, settings.encrypted)
    # The name may be archived under another codec or encryption (pushed before a config
    # change): compare with every copy, decoded, whatever today's settings. The configured key
    # itself is also protected by put-if-absent below (a concurrent pusher).
    existing = find_variants(repo, name)
    if existing:
        for other in existing:
            _same_as_stored(repo, other, name, settings, digest, size)
        return PushResult(name, existing[0], "duplicate", size, 0, time.monotonic() - t0)
    stored = hashlib.sha256()
    stored_size = 0

    def counted() -> Iterator[bytes]:
        nonlocal stored_size
        if data is not None:
            chunks: Iterable[bytes] = (
                build_header(name, settings, digest, size),
                _compress_bytes(data, settings),
            )
        else:
            chunks = _encoded(path, name, settings, digest, size)
        for chunk in chunks:
            stored.update(chunk)
            stored_size += len(chunk)
            yield chunk

    try:
        put = repo.put_stream(key, counted())
    except AlreadyExists:
        # another pusher won the race: same content is fine, different is a conflict
        _same_as_stored(repo, key, name, settings, digest, size)
        return PushResult(name, key, "duplicate", size, 0, time.monotonic() - t0)
    if put.size != stored_size or put.sha256 != stored.hexdigest():
        raise StorageUnavailable(f"{key}: the repository recorded other bytes than were sent")
    return PushResult(name, key, "stored", size, stored_size, time.monotonic() - t0)


def _same_as_stored(
    repo: Repository, key: str, name: str, settings: WalSettings, digest: str, size: int
) -> None:
    """Succeed only when the stored object decodes, intact, to exactly the local file."""
    what = f"archived {name}"
    try:
        header, raw = decode_object(repo.iter_object(key), settings, what)
        local_alg = "hmac-sha256" if settings.key else "sha256"
        if header.digest_alg == local_alg and (header.digest != digest or header.raw_size != size):
            raise WalConflict(
                f"{name} is already archived with different content ({header.raw_size} bytes, "
                f"{header.digest_alg} {header.digest[:12]}...; local file {size} bytes, "
                f"{digest[:12]}...); the stored copy was kept"
            )
        d = _RawDigest(settings.key)
        for chunk in raw:
            d.update(chunk)
    except ChecksumMismatch as exc:
        raise WalConflict(
            f"{name} is already archived but the stored copy is unreadable ({exc}); it was kept, "
            "not overwritten: inspect and remove it by hand"
        ) from None
    except PreconditionFailed as exc:
        raise WalConflict(
            f"{name} is already archived as {key} and cannot be compared with the local file "
            f"({exc}); the stored copy was kept, nothing was pushed"
        ) from None
    if d.hexdigest() != digest or d.size != size:
        raise WalConflict(f"{name} is already archived with different content; the stored copy was kept")


# ---------------------------------------------------------------- the look-ahead spool


def config_stamp(config_path: str | Path) -> str:
    """Identifies a config file's version: spool state is only trusted under the same one."""
    return walserve.config_stamp(str(config_path))


def file_stamp(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def spool_root(pg_wal: Path) -> Path:
    return pg_wal / SPOOL_DIR


def _ensure_dir(folder: Path, like: Path) -> None:
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


def _atomic_write(path: Path, data: bytes, like: Path | None = None, durable: bool = True) -> None:
    """Write through a temporary name and rename. Marks need no fsync (``durable=False``): one
    lost or torn in a crash reads as absent, and the file is then pushed again — harmless."""
    like = like or path.parent
    _ensure_dir(path.parent, like)
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


def mark_archived(path: Path, result: PushResult, stamp: str) -> None:
    """Record (after the object is durable) that this exact file is archived."""
    body = {"name": result.name, "key": result.key, "config": stamp, **file_stamp(path)}
    _atomic_write(
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


@dataclass(frozen=True)
class LookaheadResult:
    own: PushResult
    ahead: tuple[PushResult, ...]
    failed_ahead: tuple[str, ...]


def push_with_lookahead(
    repo: Repository, path: Path, settings: WalSettings, *, parallel: int, stamp: str
) -> LookaheadResult:
    """Push ``path`` and, in parallel, up to ``parallel - 1`` other files already ``.ready`` in
    archive_status, marking each one stored; the caller's exit status depends on ``path`` only."""
    path = path.absolute()
    pg_wal = path.parent
    others: list[str] = []
    if parallel > 1:
        for name in ready_files(pg_wal):
            if name == path.name or already_archived(pg_wal / name, stamp):
                continue
            others.append(name)
            if len(others) >= parallel - 1:
                break
    can_mark = spool_writable(pg_wal)
    with ThreadPoolExecutor(max(1, len(others) + 1), thread_name_prefix="wal-push") as pool:
        own_f = pool.submit(push_file, repo, path, settings)
        ahead_f: dict[str, Future[PushResult]] = {
            n: pool.submit(push_file, repo, pg_wal / n, settings) for n in others
        }
        ahead: list[PushResult] = []
        failed: list[str] = []
        for name, fut in ahead_f.items():
            try:
                res = fut.result()
                if can_mark:
                    mark_archived(pg_wal / name, res, stamp)
                ahead.append(res)
            except (DRError, OSError) as exc:
                # it will be pushed again when PostgreSQL asks for it
                failed.append(name)
                log.warning("look-ahead push of %s failed (it will be retried): %s", name, exc)
        own = own_f.result()
    with contextlib.suppress(OSError):
        prune_spool(pg_wal)
    return LookaheadResult(own, tuple(ahead), tuple(failed))


def spool_writable(pg_wal: Path) -> bool:
    root = spool_root(pg_wal)
    try:
        _ensure_dir(root / "archived", pg_wal)
    except OSError:
        return False
    return os.access(root / "archived", os.W_OK)


# ---------------------------------------------------------------- fetch


def _write_verified(
    repo: Repository, key: str, name: str, settings: WalSettings, dest: Path, pgdata: Path | None = None
) -> tuple[int, WalHeader]:
    """Stream the object into ``dest`` through a temporary name; rename only once verified
    (and, for a segment fetched for a data directory, once its first page says it belongs to
    that cluster at that address: PostgreSQL would take a foreign segment for the end of WAL)."""
    tmp = dest.with_name(f".{dest.name}.gravl-{uuid.uuid4().hex[:8]}")
    size = 0
    try:
        header, raw = decode_object(repo.iter_object(key), settings, f"archived {name}")
        with open(tmp, "xb") as out:
            for chunk in raw:
                out.write(chunk)
                size += len(chunk)
        if pgdata is not None and (pgdata / "global" / "pg_control").exists():
            with open(tmp, "rb") as fh:
                head = fh.read(walserve.LONG_HEADER.size)
            problem = walserve.header_problem(head, name, size, walserve.system_identifier(str(pgdata)))
            if problem is not None:
                raise PermanentError(f"archived {name} does not belong to this cluster: {problem}")
        os.replace(tmp, dest)
    except NotFound:
        # find_object saw it a moment ago: a file that vanished is not the end of the archive
        raise WalVanished(
            f"{name} is listed in the archive as {key} but reading it failed with 'not found' "
            "(removed meanwhile, or the store is not yet consistent)"
        ) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return size, header


def _pgdata_of(dest: Path) -> Path:
    """The data directory of a restore_command destination (%p is pg_wal/RECOVERYXLOG)."""
    return dest.absolute().parent.parent


def fetch_file(repo: Repository, name: str, dest: Path, settings: WalSettings) -> int:
    """Fetch one archived file to ``dest``, verified. WalMissing when it is not archived."""
    wal = parse_wal_name(name)
    key = find_object(repo, name, settings)
    if key is None:
        raise WalMissing(f"{name} is not in the archive")
    pgdata = _pgdata_of(dest) if wal.kind == "segment" else None
    return _write_verified(repo, key, name, settings, dest, pgdata)[0]


def prefetch_dir(dest: Path) -> Path:
    return Path(walserve.prefetch_folder(str(dest)))


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
        mark = walserve.read_mark(str(folder / (name + walserve.MARK_SUFFIX))) or {}
        alg = mark.get("alg")
        if alg in ("sha256", "hmac-sha256") and not (alg == "hmac-sha256" and key is None):
            try:
                digest, _size = file_digest(folder / name, key if alg == "hmac-sha256" else None)
            except DRError:
                return False
            if digest == mark.get("digest"):
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


# ---------------------------------------------------------------- the background prefetcher
#
# As pgBackRest's asynchronous archive-get: the first wal-fetch that has to go to the repository
# starts one detached prefetcher per pg_wal. It keeps ``depth`` verified segments ahead of the
# one recovery last asked for in pg_wal/gravl-dr/prefetch/, so PostgreSQL's next calls are
# answered by tasks.walserve with a rename while the prefetcher fetches, decompresses and
# verifies on the other cores, overlapping with replay. It learns where recovery is from the
# ``want`` file (written by wal-fetch when it has to fetch a file itself) and from the files the
# fast path takes away; it exits when recovery ends (recovery.signal, once seen, is gone) or
# after ``idle_exit`` seconds without either.

PREFETCHER_LOCK = "prefetcher.lock"
PREFETCHER_LOG = "prefetcher.log"
WANT_FILE = "want"


def note_wanted(dest: Path, name: str) -> None:
    """Tell the prefetcher which segment recovery asked for (it prefetches from the next)."""
    folder = prefetch_dir(dest)
    with contextlib.suppress(OSError):
        _atomic_write(folder / WANT_FILE, name.encode(), like=folder.parent.parent, durable=False)


def prime_prefetch(pgdata: Path, start_wal: str) -> None:
    """Before a restored server starts: tell the prefetcher to begin at the backup's first
    segment (``start_wal``), so it fetches ahead while recovery is still starting."""
    wal = parse_wal_name(start_wal)
    if wal.kind != "segment" or not wal.segno:
        return
    note_wanted(pgdata / "pg_wal" / "RECOVERYXLOG", segment_name(wal.timeline, wal.segno - 1))


def prefetch_primed(dest: Path) -> bool:
    return (prefetch_dir(dest) / WANT_FILE).exists()


def prefetcher_pid(pg_wal: Path) -> int | None:
    try:
        pid = int((spool_root(pg_wal) / "prefetcher.pid").read_text().strip())
        os.kill(pid, 0)
    except PermissionError:
        return pid
    except (OSError, ValueError):
        return None
    return pid


def _prefetch_one(
    repo: Repository, name: str, settings: WalSettings, folder: Path, stamp: str, pgdata: Path
) -> bool:
    """Fetch, verify and mark one segment ahead; False when it is not (yet) archived (then a
    fresh "missing" mark lets the fast path answer recovery's request for it at once)."""
    key = find_object(repo, name, settings)
    if key is None:
        _mark_missing(repo, name, folder, stamp)
        return False
    try:
        _size, header = _write_verified(repo, key, name, settings, folder / name, pgdata)
    except WalMissing:
        _mark_missing(repo, name, folder, stamp)
        return False
    with contextlib.suppress(FileNotFoundError):
        (folder / (name + walserve.MISSING_SUFFIX)).unlink()
    st = (folder / name).stat()
    _atomic_write(
        folder / (name + walserve.MARK_SUFFIX),
        walserve.mark_text(stamp, st, header.digest_alg, header.digest).encode(),
        like=folder.parent.parent,
        durable=False,
    )
    return True


def _probe_history(repo: Repository, name: str, settings: WalSettings, folder: Path, stamp: str) -> bool:
    if find_object(repo, name, settings) is not None:
        with contextlib.suppress(FileNotFoundError):
            (folder / (name + walserve.MISSING_SUFFIX)).unlink()
        return True
    _mark_missing(repo, name, folder, stamp)
    return False


def _prune_served(folder: Path, keep: str) -> None:
    """Drop segments the fast path served, except the newest (``keep``): PostgreSQL asks for the
    last segment again at the end of recovery."""
    for entry in os.listdir(folder):
        if entry.endswith(walserve.SERVED_SUFFIX) and entry[:24] < keep:
            for stale in (entry, entry[:24]):
                with contextlib.suppress(OSError):
                    (folder / stale).unlink()


def _mark_missing(repo: Repository, name: str, folder: Path, stamp: str) -> None:
    """Record that ``name`` is not in the archive, once the repository proved reachable (an
    unmounted repository is not the end of the archive)."""
    repository_reachable(repo)
    _atomic_write(
        folder / (name + walserve.MISSING_SUFFIX),
        walserve.missing_text(stamp).encode(),
        like=folder.parent.parent,
        durable=False,
    )


def run_prefetcher(
    repo: Repository,
    settings: WalSettings,
    pg_wal: Path,
    stamp: str,
    *,
    depth: int,
    parallel: int,
    idle_exit: float = 30.0,
) -> int:
    """Keep ``depth`` segments prefetched ahead of recovery until it ends; returns the count."""
    import fcntl

    root = spool_root(pg_wal)
    _ensure_dir(root, pg_wal)
    lock = os.open(root / PREFETCHER_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(lock)
        return 0  # another prefetcher serves this pg_wal
    _atomic_write(root / "prefetcher.pid", str(os.getpid()).encode(), like=pg_wal, durable=False)
    folder = root / "prefetch"
    _ensure_dir(folder, pg_wal)
    pgdata = pg_wal.absolute().parent
    signal_file = pgdata / "recovery.signal"
    in_recovery = signal_file.exists()
    for entry in os.listdir(folder):  # what an earlier prefetcher left is not trusted
        if entry not in (WANT_FILE, walserve.WINDOW_FILE):
            with contextlib.suppress(OSError):
                (folder / entry).unlink()
    fetched = 0
    want: str | None = None
    timeline, next_segno = 0, -1
    window = ""
    ours: set[str] = set()
    in_flight: dict[str, Future[bool]] = {}
    retry_at = history_at = 0.0
    active = time.monotonic()
    try:
        with ThreadPoolExecutor(max(1, parallel), thread_name_prefix="wal-prefetch") as pool:
            while pg_wal.is_dir():
                now = time.monotonic()
                if in_recovery and not signal_file.exists() and not in_flight:
                    break  # recovery ended: the server promoted
                in_recovery = in_recovery or signal_file.exists()
                try:
                    wanted = (folder / WANT_FILE).read_text().strip()
                except OSError:
                    wanted = None
                if wanted and wanted != want:
                    want, active = wanted, now
                    wal = parse_wal_name(wanted)
                    if (
                        wal.kind == "segment"
                        and wal.segno is not None
                        and (wal.timeline != timeline or not wal.segno < next_segno <= wal.segno + depth + 1)
                    ):
                        timeline, next_segno, retry_at = wal.timeline, wal.segno + 1, 0.0
                    for entry in os.listdir(folder):  # what recovery has passed
                        if len(entry) >= 24 and not entry.startswith(".") and entry[:24] < wanted:
                            with contextlib.suppress(OSError):
                                (folder / entry).unlink()
                for name, fut in list(in_flight.items()):
                    if not fut.done():
                        continue
                    del in_flight[name]
                    if name.endswith(".history"):
                        with contextlib.suppress(DRError, OSError):
                            fut.result()
                        continue
                    try:
                        if fut.result():
                            fetched += 1
                            if want is not None and name <= want:  # recovery got it already
                                for stale in (name, name + walserve.MARK_SUFFIX):
                                    with contextlib.suppress(OSError):
                                        (folder / stale).unlink()
                            else:
                                ours.add(name)
                            continue
                    except (DRError, OSError) as exc:
                        log.warning("prefetch of %s failed: %s", name, exc)
                    # not archived yet, or failed (wal-fetch reports it when recovery asks):
                    # resume from there a little later
                    segno = parse_wal_name(name).segno
                    if segno is not None and segno < next_segno:
                        next_segno = segno
                    retry_at = now + 1.0
                # taken by the fast path: its mark is gone (the file stays as the last served)
                taken = {n for n in ours if not (folder / (n + walserve.MARK_SUFFIX)).exists()}
                if taken:
                    ours -= taken
                    active = now
                    _prune_served(folder, keep=max(taken))
                if timeline and now >= history_at:
                    # recovery_target_timeline = latest: PostgreSQL probes for the next timeline's
                    # history file at the start and at the end of recovery
                    history_at = now + walserve.MISSING_FRESH / 3
                    nxt = f"{timeline + 1:08X}.history"
                    if nxt not in in_flight:
                        in_flight[nxt] = pool.submit(_probe_history, repo, nxt, settings, folder, stamp)
                if timeline and now >= retry_at:
                    while len(in_flight) + len(ours) < depth:
                        name = segment_name(timeline, next_segno)
                        next_segno += 1
                        if name in in_flight or (folder / name).exists():
                            continue
                        in_flight[name] = pool.submit(
                            _prefetch_one, repo, name, settings, folder, stamp, pgdata
                        )
                if timeline:
                    held = sorted({n for n in in_flight if len(n) == 24} | ours)
                    current = " ".join([str(os.getpid()), *held])
                    if current != window:  # what the fast path may wait for (tasks.walserve)
                        window = current
                        _atomic_write(
                            folder / walserve.WINDOW_FILE, window.encode(), like=pg_wal, durable=False
                        )
                if not in_flight and now - active > idle_exit:
                    break
                time.sleep(0.005)
    finally:
        with contextlib.suppress(OSError):
            (folder / walserve.WINDOW_FILE).unlink()
        os.close(lock)
    return fetched


def repository_reachable(repo: Repository) -> None:
    """Raise unless the repository answers and looks like one (a missing file is then truly
    missing, not a mount that went away)."""
    from tasks.repository import FileRepository

    if isinstance(repo, FileRepository):
        root = repo.root
        if not root.is_dir():
            raise StorageUnavailable(f"repository {repo.url} is not reachable (no such directory)")
        if not any((root / d).is_dir() for d in ("wal", "backups")):
            raise StorageUnavailable(f"repository {repo.url} holds neither backups nor WAL: is it mounted?")
        return
    repo.check()


# ---------------------------------------------------------------- settings cache (no pydantic on the hot path)


def save_settings_cache(pg_wal: Path, stamp: str, repo_cfg: Any) -> None:
    """Remember what a file-repository push or fetch needs from this config version, so the next
    calls skip loading the config model (pydantic costs more than the push itself). Holds no
    secret: only the name of the key's environment variable."""
    if not str(repo_cfg.url).startswith("file://"):
        return
    body = {
        "config": stamp,
        "url": repo_cfg.url,
        "codec": repo_cfg.compression,
        "level": repo_cfg.compression_level,
        "key_env": repo_cfg.encryption_key_env,
    }
    with contextlib.suppress(OSError):
        _atomic_write(
            spool_root(pg_wal) / "settings.json", json.dumps(body).encode(), like=pg_wal, durable=False
        )


def load_settings_cache(pg_wal: Path, stamp: str) -> tuple[Repository, WalSettings] | None:
    """The file repository and settings saved under this exact config version, or None."""
    try:
        body = json.loads((spool_root(pg_wal) / "settings.json").read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(body, dict) or body.get("config") != stamp:
        return None
    from urllib.parse import urlparse

    from tasks.repository import FileRepository
    from tasks.streams import load_key

    url = str(body.get("url", ""))
    path = urlparse(url).path
    codec = body.get("codec")
    if not url.startswith("file://") or not path.startswith("/") or codec not in CODEC_SUFFIX:
        return None
    level = body.get("level")
    settings = WalSettings(
        codec=str(codec),
        level=int(level) if isinstance(level, int) else None,
        key=load_key(body.get("key_env") or None),
    )
    return FileRepository(Path(path), url), settings


# ---------------------------------------------------------------- the background pusher (async mode)
#
# As pgBackRest's archive-async: the first wal-push starts one detached pusher per pg_wal; it
# keeps its interpreter, config and repository client warm, pushes every .ready file (oldest
# first, several at once) and marks each one archived (.ok) or failed (.err). wal-push itself
# only waits for its file's mark, so a call costs an interpreter start, not a boto3 client and a
# compression. The .ok mark is written only once the object is durable, so a crash of either
# process loses nothing: an unmarked file is pushed again (identical content is a success).

PUSHER_LOCK = "pusher.lock"
PUSHER_LOG = "pusher.log"


def failure_path(path: Path) -> Path:
    return spool_root(path.parent) / "archived" / f"{path.name}.err"


def mark_failed(path: Path, message: str) -> None:
    """Record why pushing this exact file failed; the waiting wal-push reports it."""
    try:
        body = {"name": path.name, "error": message, **file_stamp(path)}
    except OSError:
        return
    with contextlib.suppress(OSError):
        _atomic_write(failure_path(path), json.dumps(body).encode(), like=path.parent, durable=False)


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


def _failed_recently(path: Path) -> bool:
    return failure_path(path).exists()


def pusher_lock(pg_wal: Path) -> int | None:
    """Take the one-pusher-per-pg_wal lock (released when the process exits); None if held."""
    import fcntl

    root = spool_root(pg_wal)
    _ensure_dir(root, pg_wal)
    fd = os.open(root / PUSHER_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def pusher_pid(pg_wal: Path) -> int | None:
    """The pid of the live pusher of this pg_wal, from its pid file, or None."""
    try:
        pid = int((spool_root(pg_wal) / "pusher.pid").read_text().strip())
        os.kill(pid, 0)
    except PermissionError:
        return pid
    except (OSError, ValueError):
        return None
    return pid


def run_pusher(
    repo: Repository,
    settings: WalSettings,
    pg_wal: Path,
    stamp: str,
    *,
    parallel: int,
    idle_exit: float = 10.0,
) -> int:
    """Push every .ready file until none has come for ``idle_exit`` seconds; returns the count."""
    lock = pusher_lock(pg_wal)
    if lock is None:
        return 0  # another pusher serves this pg_wal
    _atomic_write(spool_root(pg_wal) / "pusher.pid", str(os.getpid()).encode(), like=pg_wal, durable=False)
    pushed = 0
    idle_since = time.monotonic()
    in_flight: dict[str, Future[PushResult]] = {}
    try:
        with ThreadPoolExecutor(max(1, parallel), thread_name_prefix="wal-pusher") as pool:
            while pg_wal.is_dir():
                for name, fut in list(in_flight.items()):
                    if not fut.done():
                        continue
                    del in_flight[name]
                    if name.endswith(".history"):
                        with contextlib.suppress(DRError, OSError):
                            fut.result()
                        continue
                    try:
                        res = fut.result()
                        mark_archived(pg_wal / name, res, stamp)
                        pushed += 1
                        log.info(
                            "%s %s: %d -> %d bytes in %.0f ms",
                            name,
                            res.outcome,
                            res.raw_size,
                            res.stored_size,
                            res.seconds * 1000,
                        )
                    except (DRError, OSError) as exc:
                        log.warning("push of %s failed: %s", name, exc)
                        mark_failed(pg_wal / name, str(exc))
                for name in ready_files(pg_wal):
                    if len(in_flight) >= parallel:
                        break
                    path = pg_wal / name
                    if name in in_flight or already_archived(path, stamp) or _failed_recently(path):
                        continue
                    in_flight[name] = pool.submit(push_file, repo, path, settings)
                if in_flight:
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since > idle_exit:
                    break
                time.sleep(0.02)
                with contextlib.suppress(OSError):
                    if not in_flight:
                        prune_spool(pg_wal)
    finally:
        os.close(lock)
    return pushed


def wait_for_pusher(path: Path, stamp: str, *, timeout: float, alive: Callable[[], bool]) -> str | None:
    """Wait until the pusher marked ``path`` archived ("ok") or failed (the message); None when
    the pusher is gone or too slow (the caller then pushes the file itself)."""
    deadline = time.monotonic() + timeout
    checks = 0
    while time.monotonic() < deadline:
        if already_archived(path, stamp):
            return "ok"
        failure = take_failure(path)
        if failure is not None:
            return failure
        checks += 1
        if checks % 10 == 0 and not alive():
            return "ok" if already_archived(path, stamp) else None
        time.sleep(0.01)
    return None
