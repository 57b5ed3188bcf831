"""Adapter: WAL files in the repository — object keys, finding and listing, pushing and fetching one file.

An archived file is one object ``wal/<timeline>/<name><codec suffix>[.enc]`` in the format of
``tasks.walformat``. Everything here goes through the ``Repository`` interface; nothing is
ever overwritten (put-if-absent), and the same content archived again is a success.

No Prefect import and, for file repositories, no boto3 import: PostgreSQL runs ``wal-push`` and
``wal-fetch`` once per 16 MB segment.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from tasks import walserve
from tasks.errors import (
    AlreadyExists,
    ChecksumMismatch,
    NotFound,
    PermanentError,
    PreconditionFailed,
    StorageUnavailable,
)
from tasks.streams import CODEC_SUFFIX, ENC_SUFFIX
from tasks.walformat import WalHeader, WalSettings, decode_object, encode_object, raw_digest
from tasks.walnames import WAL_NAME_RE, parse_wal_name

if TYPE_CHECKING:
    from tasks.repository import Repository

READ_CHUNK = 4 * 1024 * 1024
IN_MEMORY_LIMIT = 64 * 1024 * 1024  # files up to this size are read once, hashed and compressed in memory


class WalConflict(PermanentError):
    """A file of that name is archived already with different content; the stored copy is kept."""


class WalMissing(NotFound):
    """The archive has no file of that name (PostgreSQL reads this as the end of the archive)."""


class WalVanished(StorageUnavailable):
    """The archive listed the file, then could not return it (removed meanwhile by a concurrent
    expire, or a store not yet consistent): not the end of the archive, recovery must stop."""


# ---------------------------------------------------------------- keys


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


# ---------------------------------------------------------------- finding objects


def find_object(
    repo: Repository, name: str, settings: WalSettings, *, probe_first: bool = True
) -> str | None:
    """The key under which ``name`` is archived, or None. One request in the usual case (the
    configured codec); on S3 a miss costs one prefix listing, not a probe per codec. Without
    ``probe_first`` the configured codec's key gets no request of its own (a GET of it just
    failed, or the name is usually absent: a history probe): one listing answers for every
    variant. On S3 a None always comes from a listing that succeeded (see repository_reachable)."""
    variants = key_variants(name, settings.codec, settings.encrypted)
    if probe_first and repo.exists(variants[0]):
        return variants[0]
    found = _stored_names(repo, name)
    for key in variants[1:] if probe_first else variants:
        if repo.exists(key) if found is None else key.rsplit("/", 1)[-1] in found:
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
    keys = repo.keys_starting_with(f"{parse_wal_name(name).folder}/{name}", 50)
    if keys is None:
        return None
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


def repository_reachable(repo: Repository, *, listed: bool = False) -> None:
    """Raise unless the repository answers and looks like one (a missing file is then truly
    missing, not a mount that went away). ``listed``: find_object just returned None, which on
    a bucket means a listing of it succeeded: that is the proof, no request more is made."""
    from tasks.repository import FileRepository

    if isinstance(repo, FileRepository):
        root = repo.root
        if not root.is_dir():
            raise StorageUnavailable(f"repository {repo.url} is not reachable (no such directory)")
        if not any((root / d).is_dir() for d in ("wal", "backups")):
            raise StorageUnavailable(f"repository {repo.url} holds neither backups nor WAL: is it mounted?")
        return
    if not listed:
        repo.check()


# ---------------------------------------------------------------- local files


def _unreadable(path: Path, exc: OSError) -> PreconditionFailed:
    if isinstance(exc, FileNotFoundError):
        return PreconditionFailed(f"WAL file {path} does not exist")
    return PreconditionFailed(f"cannot read WAL file {path}: {exc.strerror}")


def read_file(path: Path) -> Iterator[bytes]:
    """A WAL file's chunks; PreconditionFailed when it cannot be read."""
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise _unreadable(path, exc) from None
    with fh:
        while chunk := fh.read(READ_CHUNK):
            yield chunk


def file_digest(path: Path, key: bytes | None) -> tuple[str, int]:
    return raw_digest(read_file(path), key)


def _read_small(path: Path) -> bytes | None:
    """The whole file when it is small enough to push from memory, else None."""
    try:
        if path.stat().st_size <= IN_MEMORY_LIMIT:
            return path.read_bytes()
    except OSError as exc:
        raise _unreadable(path, exc) from None
    return None


def _reread(path: Path, name: str, settings: WalSettings, digest: str, size: int) -> Iterator[bytes]:
    """The file read again, hashed on the way: if it changed since its header was built, the
    stream fails before its last chunk, so the repository never commits an object whose header
    lies."""
    from tasks.walformat import RawDigest

    check = RawDigest(settings.key)
    for chunk in read_file(path):
        check.update(chunk)
        yield chunk
    if check.size != size or check.hexdigest() != digest:
        raise PreconditionFailed(f"WAL file {name} changed while it was being archived")


# ---------------------------------------------------------------- push


@dataclass(frozen=True)
class PushResult:
    name: str
    key: str
    outcome: Literal["stored", "duplicate", "spooled"]
    raw_size: int
    stored_size: int
    seconds: float


def push_file(repo: Repository, path: Path, settings: WalSettings) -> PushResult:
    """Archive one WAL file: durable on success, never overwriting. The same content already
    archived is a success ("duplicate"); different content raises WalConflict."""
    from tasks.streams import Digest, hashed

    t0 = time.monotonic()
    name = path.name
    parse_wal_name(name)
    data = _read_small(path)
    digest, size = raw_digest([data], settings.key) if data is not None else file_digest(path, settings.key)
    key = object_key(name, settings.codec, settings.encrypted)
    # The name may be archived under another codec or encryption (pushed before a config
    # change): compare with every copy, decoded, whatever today's settings. The configured key
    # itself is also protected by put-if-absent below (a concurrent pusher).
    existing = find_variants(repo, name)
    if existing:
        for other in existing:
            _same_as_stored(repo, other, name, settings, digest, size)
        return PushResult(name, existing[0], "duplicate", size, 0, time.monotonic() - t0)
    # A file read into memory is compressed in this thread (the look-ahead already runs several
    # files at once, and zstd's worker threads cost more than they give on 16 MB).
    raw: Iterable[bytes] = [data] if data is not None else _reread(path, name, settings, digest, size)
    stored = Digest()
    encoded = encode_object(raw, name, settings, digest, size, threads=0 if data is not None else None)
    try:
        put = repo.put_stream(key, hashed(encoded, stored))
    except AlreadyExists:
        # another pusher won the race: same content is fine, different is a conflict
        _same_as_stored(repo, key, name, settings, digest, size)
        return PushResult(name, key, "duplicate", size, 0, time.monotonic() - t0)
    if put.size != stored.size or put.sha256 != stored.hexdigest():
        raise StorageUnavailable(f"{key}: the repository recorded other bytes than were sent")
    return PushResult(name, key, "stored", size, stored.size, time.monotonic() - t0)


def _same_as_stored(
    repo: Repository, key: str, name: str, settings: WalSettings, digest: str, size: int
) -> None:
    """Succeed only when the stored object decodes, intact, to exactly the local file."""
    what = f"archived {name}"
    try:
        header, raw = decode_object(repo.iter_object(key), settings, what)
        if header.digest_alg == settings.digest_alg and (header.digest != digest or header.raw_size != size):
            raise WalConflict(
                f"{name} is already archived with different content ({header.raw_size} bytes, "
                f"{header.digest_alg} {header.digest[:12]}...; local file {size} bytes, "
                f"{digest[:12]}...); the stored copy was kept"
            )
        stored_digest, stored_size = raw_digest(raw, settings.key)
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
    if stored_digest != digest or stored_size != size:
        raise WalConflict(f"{name} is already archived with different content; the stored copy was kept")


# ---------------------------------------------------------------- fetch


def write_verified(
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
    return write_verified(repo, key, name, settings, dest, pgdata)[0]
