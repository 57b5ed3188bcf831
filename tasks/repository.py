"""Adapter: the backup repository, one interface over a local directory and S3.

Layout (DESIGN.md): ``<prefix>/backups/<id>/...``, ``<prefix>/wal/<tli>/...``,
``<prefix>/drills/<id>/...``, ``<prefix>/locks/...``. Objects are never overwritten: the file
backend links a fsynced temporary file into place (link(2) fails on an existing name); the S3
backend sends ``If-None-Match: *`` with the write that makes an object visible. boto3 is only
imported for s3:// repositories so that file-repository commands stay fast.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlparse

from tasks.errors import (
    AlreadyExists,
    ConfigError,
    DRError,
    InternalError,
    NotFound,
    PreconditionFailed,
    StorageUnavailable,
    botocore_transient,
    classify_aws,
)

if TYPE_CHECKING:
    from tasks.config import RepositoryConfig

log = logging.getLogger(__name__)

READ_CHUNK = 4 * 1024 * 1024
# what a transient botocore error means to an operator, where "unreachable" would mislead
_BOTOCORE_REASON = {
    "FlexibleChecksumError": "the download failed the SDK's checksum (corrupt on the way or at rest)"
}
_TMP_MARK = ".gravl-tmp-"


@dataclass(frozen=True)
class PutResult:
    key: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Incomplete:
    """What a killed or failed writer left: an open multipart upload or a temporary file."""

    key: str
    kind: str  # "multipart upload" or "temporary file"
    size: int
    age_seconds: float
    upload_id: str | None = None

    def describe(self) -> str:
        return f"{self.kind} {self.key} ({self.size} bytes, {self.age_seconds / 3600:.1f} h old)"


class Repository(Protocol):
    url: str

    def put_stream(self, key: str, chunks: Iterable[bytes]) -> PutResult: ...
    def put_bytes(self, key: str, data: bytes) -> PutResult: ...
    def iter_object(self, key: str, chunk_size: int = READ_CHUNK) -> Iterator[bytes]: ...
    def get_bytes(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def size(self, key: str) -> int: ...
    def list_keys(self, prefix: str) -> list[str]: ...
    def keys_starting_with(self, start: str, limit: int = 1000) -> list[str] | None: ...
    def delete(self, key: str) -> None: ...
    def abort_incomplete(self, prefix: str) -> int: ...
    def find_incomplete(self, older_than: float) -> list[Incomplete]: ...
    def remove_incomplete(self, item: Incomplete) -> None: ...
    def check(self, write: bool = False) -> None: ...


def _clean_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise PreconditionFailed(f"invalid object key: {key!r}")
    return key


class FileRepository:
    """A directory on a local (or mounted) filesystem."""

    def __init__(self, root: Path, url: str) -> None:
        self.root = root
        self.url = url

    def _path(self, key: str) -> Path:
        return self.root / _clean_key(key)

    def check(self, write: bool = False) -> None:
        if not self.root.exists():
            if not write:
                raise NotFound(f"repository {self.url} does not exist")
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise PreconditionFailed(f"cannot create repository {self.url}: {exc.strerror}") from None
        if not self.root.is_dir():
            raise PreconditionFailed(f"repository {self.url} is not a directory")
        if write and not os.access(self.root, os.W_OK):
            raise PreconditionFailed(f"repository {self.url} is not writable")

    def free_bytes(self) -> int:
        self.check(write=True)
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def put_stream(self, key: str, chunks: Iterable[bytes]) -> PutResult:
        final = self._path(key)
        if final.exists():
            raise AlreadyExists(f"object {key} already exists in the repository")
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f"{_TMP_MARK}{final.name}.{uuid.uuid4().hex[:8]}"
        digest = hashlib.sha256()
        size = 0
        try:
            with open(tmp, "xb") as out:
                for chunk in chunks:
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            try:
                os.link(tmp, final)  # atomic and refuses to replace an existing name
            except FileExistsError:
                raise AlreadyExists(f"object {key} already exists in the repository") from None
            _fsync_dir(final.parent)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise PreconditionFailed(f"repository {self.url} is full while writing {key}") from None
            raise StorageUnavailable(f"cannot write {key}: {exc.strerror}") from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return PutResult(key, size, digest.hexdigest())

    def put_bytes(self, key: str, data: bytes) -> PutResult:
        return self.put_stream(key, [data])

    def iter_object(self, key: str, chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
        path = self._path(key)
        try:
            fh = open(path, "rb")
        except FileNotFoundError:
            raise NotFound(f"object {key} not found in the repository") from None
        except OSError as exc:
            raise StorageUnavailable(f"cannot read {key}: {exc.strerror}") from exc
        with fh:
            while chunk := fh.read(chunk_size):
                yield chunk

    def get_bytes(self, key: str) -> bytes:
        return b"".join(self.iter_object(key))

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise NotFound(f"object {key} not found in the repository") from None

    def list_keys(self, prefix: str) -> list[str]:
        base = self.root / prefix if prefix else self.root
        if not base.exists():
            return []
        keys = []
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.startswith(_TMP_MARK):
                    continue
                keys.append(str(Path(dirpath, name).relative_to(self.root)))
        return sorted(keys)

    def keys_starting_with(self, start: str, limit: int = 1000) -> list[str] | None:
        """None: a directory has no listing by a name prefix cheaper than a stat per name."""
        return None

    def delete(self, key: str) -> None:
        path = self._path(key)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        # prune empty directories up to the root
        parent = path.parent
        while parent != self.root and parent.is_dir():
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def prune_empty(self, prefix: str) -> None:
        """Remove ``prefix`` and its parents up to the root while they are empty directories
        (a failed write leaves its folder behind: backups/<id>/ must not look like a backup)."""
        path = self._path(prefix)
        while path != self.root and path.is_dir():
            try:
                path.rmdir()
            except OSError:
                break
            path = path.parent

    def abort_incomplete(self, prefix: str) -> int:
        """Remove temporary files older than an hour left by a killed writer."""
        base = self.root / prefix if prefix else self.root
        removed = 0
        if not base.exists():
            return 0
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.startswith(_TMP_MARK):
                    path = Path(dirpath, name)
                    with contextlib.suppress(FileNotFoundError):
                        if time.time() - path.stat().st_mtime > 3600:
                            path.unlink()
                            removed += 1
        return removed

    def find_incomplete(self, older_than: float) -> list[Incomplete]:
        """Temporary files (a writer killed before linking its file into place) not modified
        for ``older_than`` seconds."""
        found: list[Incomplete] = []
        if not self.root.exists():
            return found
        now = time.time()
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                if not name.startswith(_TMP_MARK):
                    continue
                path = Path(dirpath, name)
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue
                if now - st.st_mtime >= older_than:
                    found.append(
                        Incomplete(
                            str(path.relative_to(self.root)), "temporary file", st.st_size, now - st.st_mtime
                        )
                    )
        return sorted(found, key=lambda i: i.key)

    def remove_incomplete(self, item: Incomplete) -> None:
        path = self.root / item.key
        if not path.name.startswith(_TMP_MARK):
            raise PreconditionFailed(f"{item.key} is not a temporary file; not removed")
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


class _Tally:
    """SHA-256 and size of the bytes that went through ``count``."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.size = 0

    def count(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            self.sha.update(chunk)
            self.size += len(chunk)
            yield chunk


def _collect(
    pending: set[Future[tuple[int, str]]], parts: dict[int, str], keep: int
) -> set[Future[tuple[int, str]]]:
    """Wait until at most ``keep`` uploads are in flight, recording the finished parts' ETags
    (a failed part raises here). Returns what is still in flight."""
    while len(pending) > keep:
        done, pending = wait(pending, return_when=FIRST_COMPLETED)
        for fut in done:
            number, etag = fut.result()
            parts[number] = etag
    return pending


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class S3Repository:
    """An S3 (or S3-compatible) bucket and prefix; multipart uploads with concurrent parts."""

    def __init__(self, cfg: RepositoryConfig) -> None:
        parsed = urlparse(cfg.url)
        self.url = cfg.url
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.cfg = cfg
        self.part_size = cfg.part_size_mb * 1024 * 1024
        self.concurrency = cfg.upload_concurrency
        self._client: Any = None
        self._lock = threading.Lock()

    @property
    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                import boto3
                from botocore.config import Config as BotoConfig

                self._client = boto3.session.Session().client(
                    "s3",
                    endpoint_url=self.cfg.endpoint_url,
                    region_name=self.cfg.region,
                    config=BotoConfig(
                        connect_timeout=10,
                        read_timeout=120,
                        retries={"max_attempts": 5, "mode": "standard"},
                        max_pool_connections=max(10, self.concurrency * 2 + 2),
                    ),
                )
            return self._client

    def _full(self, key: str) -> str:
        key = _clean_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _rel(self, full: str) -> str:
        return full[len(self.prefix) + 1 :] if self.prefix else full

    def _wrap(self, exc: Exception, what: str) -> DRError:
        """An S3 or network failure as a DRError of its class (tasks.errors.classify_aws); any
        other exception is a bug of ours, permanent, never "repository unreachable"."""
        from botocore.exceptions import BotoCoreError, ClientError

        if isinstance(exc, DRError):
            return exc
        if isinstance(exc, ClientError):
            return self._client_error(exc, what)
        if isinstance(exc, BotoCoreError):
            if botocore_transient(exc):
                name = type(exc).__name__
                return StorageUnavailable(
                    f"{what}: {_BOTOCORE_REASON.get(name, 'repository unreachable')} ({name})"
                )
            return ConfigError(f"{what}: {exc}")
        if isinstance(exc, OSError) or type(exc).__module__.startswith("urllib3"):
            # sockets, TLS, a connection reset while reading a body
            return StorageUnavailable(f"{what}: repository unreachable ({type(exc).__name__})")
        log.error("unexpected error during %s", what, exc_info=exc)
        return InternalError(f"{what}: internal error {type(exc).__name__}: {exc} (a gravl-dr bug)")

    def _client_error(self, exc: Any, what: str) -> DRError:
        """An error reply of S3 (botocore's ClientError) as a DRError of its class."""
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        kind = classify_aws(code, status)
        if kind == "no_bucket":
            return PreconditionFailed(f"bucket {self.bucket} does not exist")
        if kind == "not_found":
            return NotFound(f"{what}: not found")
        if kind == "denied":
            return PreconditionFailed(f"{what}: access denied by the repository ({code or status})")
        if kind == "exists":
            return AlreadyExists(f"{what}: object already exists in the repository")
        if kind == "transient":
            return StorageUnavailable(f"{what}: repository error {code or status}")
        return PreconditionFailed(f"{what}: repository refused ({code or status})")

    def _extra(self) -> dict[str, str]:
        extra: dict[str, str] = {}
        if self.cfg.storage_class:
            extra["StorageClass"] = self.cfg.storage_class
        if self.cfg.sse:
            extra["ServerSideEncryption"] = self.cfg.sse
            if self.cfg.sse == "aws:kms" and self.cfg.kms_key_id:
                extra["SSEKMSKeyId"] = self.cfg.kms_key_id
        return extra

    def check(self, write: bool = False) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            from botocore.exceptions import ClientError

            if isinstance(exc, ClientError) and classify_aws(
                str(exc.response.get("Error", {}).get("Code", "")),
                int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0),
            ) in ("not_found", "no_bucket"):
                raise PreconditionFailed(f"bucket {self.bucket} does not exist") from None
            raise self._wrap(exc, f"bucket {self.bucket}") from None

    def put_stream(self, key: str, chunks: Iterable[bytes]) -> PutResult:
        full = self._full(key)
        if self.exists(key):
            raise AlreadyExists(f"object {key} already exists in the repository")
        tally = _Tally()
        it = tally.count(chunks)
        # Fill the first part: small objects go up in one PUT.
        buf = bytearray()
        for chunk in it:
            buf += chunk
            if len(buf) >= self.part_size:
                break
        else:
            try:
                self.client.put_object(
                    Bucket=self.bucket, Key=full, Body=bytes(buf), IfNoneMatch="*", **self._extra()
                )
            except Exception as exc:
                raise self._wrap(exc, f"put {key}") from None
            return PutResult(key, tally.size, tally.sha.hexdigest())
        self._multipart(key, full, buf, it)
        return PutResult(key, tally.size, tally.sha.hexdigest())

    def _multipart(self, key: str, full: str, buf: bytearray, it: Iterator[bytes]) -> None:
        """The rest of an object as a multipart upload, completed put-if-absent; aborted on any error."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=full, **self._extra())[
                "UploadId"
            ]
        except Exception as exc:
            raise self._wrap(exc, f"put {key}") from None
        try:
            parts = self._send_parts(full, upload_id, buf, it)
            self.client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=full,
                UploadId=upload_id,
                MultipartUpload={"Parts": [{"ETag": parts[n], "PartNumber": n} for n in sorted(parts)]},
                IfNoneMatch="*",
            )
        except BaseException as exc:
            self._abort(full, upload_id)
            if isinstance(exc, ClientError | BotoCoreError):
                raise self._wrap(exc, f"put {key}") from None
            raise

    def _send_parts(self, full: str, upload_id: str, buf: bytearray, it: Iterator[bytes]) -> dict[int, str]:
        """Cut ``buf`` and the rest of ``it`` into parts of exactly part_size bytes (the last one
        shorter) and upload them, ``concurrency`` at a time: memory stays flat. Part number -> ETag."""
        parts: dict[int, str] = {}
        pending: set[Future[tuple[int, str]]] = set()

        def send(number: int, body: bytes) -> tuple[int, str]:
            resp = self.client.upload_part(
                Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumber=number, Body=body
            )
            return number, resp["ETag"]

        number = 0
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="s3-part") as pool:
            try:
                while True:
                    while len(buf) >= self.part_size:
                        number += 1
                        body = bytes(buf[: self.part_size])
                        del buf[: self.part_size]
                        pending = _collect(pending, parts, self.concurrency)
                        pending.add(pool.submit(send, number, body))
                    nxt = next(it, None)
                    if nxt is None:
                        break
                    buf += nxt
                if buf or number == 0:
                    pending.add(pool.submit(send, number + 1, bytes(buf)))
                _collect(pending, parts, 0)
            except BaseException:
                for fut in pending:
                    fut.cancel()
                raise
        return parts

    def _abort(self, full: str, upload_id: str) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
            log.info("aborted incomplete multipart upload of %s", full)
        except Exception:  # best effort; abort_incomplete() sweeps later
            log.warning("could not abort multipart upload of %s; it will be swept later", full)

    def put_bytes(self, key: str, data: bytes) -> PutResult:
        return self.put_stream(key, [data])

    def iter_object(self, key: str, chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self._full(key))
        except Exception as exc:
            raise self._wrap(exc, f"object {key}") from None
        body = resp["Body"]
        try:
            while True:
                try:
                    chunk = body.read(chunk_size)
                except Exception as exc:
                    raise self._wrap(exc, f"reading {key}") from None
                if not chunk:
                    break
                yield chunk
        finally:
            body.close()

    def get_bytes(self, key: str) -> bytes:
        return b"".join(self.iter_object(key))

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._full(key))
            return True
        except Exception as exc:
            err = self._wrap(exc, f"object {key}")
            if isinstance(err, NotFound):
                return False
            raise err from None

    def size(self, key: str) -> int:
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self._full(key))["ContentLength"])
        except Exception as exc:
            raise self._wrap(exc, f"object {key}") from None

    def list_keys(self, prefix: str) -> list[str]:
        full_prefix = (
            self._full(prefix.rstrip("/")) + "/" if prefix else (f"{self.prefix}/" if self.prefix else "")
        )
        keys: list[str] = []
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix):
                keys.extend(self._rel(o["Key"]) for o in page.get("Contents", []))
        except Exception as exc:
            raise self._wrap(exc, f"listing {prefix or '/'}") from None
        return sorted(keys)

    def keys_starting_with(self, start: str, limit: int = 1000) -> list[str]:
        """Keys that begin with ``start`` (a name, not only a folder): one request, at most
        ``limit`` keys. A file repository has no such listing; callers stat instead."""
        try:
            resp = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self._full(start), MaxKeys=limit)
        except Exception as exc:
            raise self._wrap(exc, f"listing {start}") from None
        return [self._rel(o["Key"]) for o in resp.get("Contents", [])]

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._full(key))
        except Exception as exc:
            raise self._wrap(exc, f"delete {key}") from None

    def abort_incomplete(self, prefix: str) -> int:
        """Abort the open multipart uploads under the folder ``prefix`` (never a sibling whose
        name merely starts with it: ``backups/X`` does not reach ``backups/X-2``)."""
        full_prefix = self._folder(prefix)
        count = 0
        try:
            resp = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=full_prefix)
            for up in resp.get("Uploads", []):
                self._abort(up["Key"], up["UploadId"])
                count += 1
        except Exception as exc:
            raise self._wrap(exc, "listing multipart uploads") from None
        return count

    def find_incomplete(self, older_than: float) -> list[Incomplete]:
        """Multipart uploads under the repository's prefix started ``older_than`` seconds ago or
        more and never completed nor aborted (their parts are billed, and invisible in listings)."""
        from datetime import UTC, datetime

        found: list[Incomplete] = []
        now = datetime.now(UTC)
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self._folder("")}
        try:
            while True:
                resp = self.client.list_multipart_uploads(**kwargs)
                for up in resp.get("Uploads", []):
                    age = (now - up["Initiated"]).total_seconds()
                    if age < older_than:
                        continue
                    size = 0
                    parts = self.client.get_paginator("list_parts").paginate(
                        Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"]
                    )
                    for page in parts:
                        size += sum(int(p["Size"]) for p in page.get("Parts", []))
                    found.append(
                        Incomplete(self._rel(up["Key"]), "multipart upload", size, age, up["UploadId"])
                    )
                if not resp.get("IsTruncated"):
                    break
                kwargs["KeyMarker"] = resp.get("NextKeyMarker")
                kwargs["UploadIdMarker"] = resp.get("NextUploadIdMarker")
        except Exception as exc:
            raise self._wrap(exc, "listing multipart uploads") from None
        return sorted(found, key=lambda i: i.key)

    def remove_incomplete(self, item: Incomplete) -> None:
        if item.upload_id is None:
            raise PreconditionFailed(f"{item.key} is not a multipart upload; not removed")
        try:
            self.client.abort_multipart_upload(
                Bucket=self.bucket, Key=self._full(item.key), UploadId=item.upload_id
            )
        except Exception as exc:
            err = self._wrap(exc, f"abort upload of {item.key}")
            if not isinstance(err, NotFound):
                raise err from None

    def _folder(self, prefix: str) -> str:
        if prefix:
            return self._full(prefix.rstrip("/")) + "/"
        return f"{self.prefix}/" if self.prefix else ""

    def list_incomplete(self, prefix: str = "") -> list[str]:
        full_prefix = self._folder(prefix)
        resp = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=full_prefix)
        return [u["Key"] for u in resp.get("Uploads", [])]


def open_repository(cfg: RepositoryConfig) -> FileRepository | S3Repository:
    if cfg.url.startswith("file://"):
        path = urlparse(cfg.url).path
        if not path or path == "/":
            raise ConfigError(f"repository.url {cfg.url}: needs an absolute directory path")
        return FileRepository(Path(path), cfg.url)
    if cfg.url.startswith("s3://"):
        return S3Repository(cfg)
    raise ConfigError(f"repository.url: unsupported scheme in {cfg.url}")
