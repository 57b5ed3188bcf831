"""Pure logic: the format of an archived WAL object — a header frame, then the compressed (and encrypted) file.

An archived file is one object: a zstd *skippable frame* (magic 0x184D2A5E, ignored by
``zstd -d`` and ``lz4 -d``) holding a small JSON header with the raw size and SHA-256
(HMAC-SHA-256 when encrypted), followed by the payload made by ``tasks.streams``' codecs. The
checksum travels with the data, so there is no second object to keep in step, and a fetch
verifies every byte before PostgreSQL sees it.

Streams of chunks in, streams of chunks out: no file, repository or Prefect here (where the
objects live is ``tasks.walarchive``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from tasks.errors import ChecksumMismatch, PreconditionFailed
from tasks.streams import CODEC_SUFFIX

HEADER_MAGIC = struct.pack("<I", 0x184D2A5E)  # a zstd/lz4 skippable frame
HEADER_FORMAT = "gravl-wal/1"
MAX_HEADER = 64 * 1024
_FRAME = 8  # magic and length, then the JSON document


@dataclass(frozen=True)
class WalSettings:
    """What push and fetch need from the configuration."""

    codec: str = "zstd"
    level: int | None = None
    key: bytes | None = None

    @property
    def encrypted(self) -> bool:
        return self.key is not None

    @property
    def digest_alg(self) -> str:
        """The digest a file pushed with these settings records."""
        return "hmac-sha256" if self.key else "sha256"

    @classmethod
    def from_config(cls, repo_cfg: Any) -> WalSettings:
        from tasks.streams import load_key

        return cls(
            codec=repo_cfg.compression,
            level=repo_cfg.compression_level,
            key=load_key(repo_cfg.encryption_key_env),
        )


class RawDigest:
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


def raw_digest(chunks: Iterable[bytes], key: bytes | None) -> tuple[str, int]:
    """(digest, size) of a file's raw bytes, as its header records them."""
    d = RawDigest(key)
    for chunk in chunks:
        d.update(chunk)
    return d.hexdigest(), d.size


# ---------------------------------------------------------------- the header


@dataclass(frozen=True)
class WalHeader:
    name: str
    codec: str
    encryption: str
    raw_size: int
    digest_alg: str
    digest: str
    key_fingerprint: str | None = None


def build_header(name: str, settings: WalSettings, digest: str, size: int) -> bytes:
    from tasks.streams import STREAM_ALG, key_fingerprint

    body = {
        "format": HEADER_FORMAT,
        "name": name,
        "codec": settings.codec,
        "encryption": STREAM_ALG if settings.key else "none",
        "raw_size": size,
        "digest_alg": settings.digest_alg,
        "digest": digest,
    }
    if settings.key:
        body["key_fingerprint"] = key_fingerprint(settings.key)
    data = json.dumps(body, separators=(",", ":")).encode()
    return HEADER_MAGIC + struct.pack("<I", len(data)) + data


def _frame_length(buf: bytes, what: str) -> int:
    """The JSON document's length, from the first 8 bytes of an object."""
    if buf[:4] != HEADER_MAGIC:
        raise ChecksumMismatch(f"{what}: not a gravl-dr WAL object (no header)")
    length: int = struct.unpack("<I", buf[4:_FRAME])[0]
    if length > MAX_HEADER:
        raise ChecksumMismatch(f"{what}: header of {length} bytes is corrupt")
    return length


def _read_frame(it: Iterator[bytes], what: str) -> tuple[bytes, int]:
    """Chunks read until the header frame is complete, and where the frame ends in them."""
    buf = b""
    need = 0
    for chunk in it:
        buf += chunk
        if not need and len(buf) >= _FRAME:
            need = _FRAME + _frame_length(buf, what)
        if need > _FRAME and len(buf) >= need:
            return buf, need
    raise ChecksumMismatch(f"{what}: truncated object (header incomplete)")


def parse_header(document: bytes, what: str) -> WalHeader:
    """The header from its JSON document; ChecksumMismatch for anything but a known format."""
    try:
        doc = json.loads(document)
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
    return header


def split_header(chunks: Iterable[bytes], what: str) -> tuple[WalHeader, Iterator[bytes]]:
    """Read the header frame off an object's chunks; return it and the payload's chunks."""
    it = iter(chunks)
    buf, end = _read_frame(it, what)
    header = parse_header(buf[_FRAME:end], what)
    rest = buf[end:]

    def payload() -> Iterator[bytes]:
        if rest:
            yield rest
        yield from it

    return header, payload()


# ---------------------------------------------------------------- encode and decode


def encode_object(
    raw: Iterable[bytes],
    name: str,
    settings: WalSettings,
    digest: str,
    size: int,
    *,
    threads: int | None = None,
) -> Iterator[bytes]:
    """The object for a file whose raw bytes are ``raw`` (and whose digest and size the header
    records): header, then the payload through ``tasks.streams``' compress (and encrypt).
    ``threads``: zstd's worker threads (see ``tasks.streams.compress``)."""
    from tasks.streams import compress, encrypt

    yield build_header(name, settings, digest, size)
    stage: Iterable[bytes] = compress(raw, settings.codec, settings.level, threads=threads)
    if settings.key:
        stage = encrypt(stage, settings.key)
    yield from stage


def _checked(stage: Iterable[bytes], header: WalHeader, key: bytes | None, what: str) -> Iterator[bytes]:
    """Pass the raw bytes through; raise ChecksumMismatch unless size and digest match the header."""
    d = RawDigest(key)
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
    return header, _checked(stage, header, key, what)
