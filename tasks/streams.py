"""Adapter: composable stream stages for the data path (source -> compress -> hash -> encrypt -> sink).

Every stage takes and yields chunks of bytes; nothing holds a whole object. Stages can run in
their own thread behind a bounded queue (``threaded``), so reading the source, compressing and
writing overlap while memory stays bounded by chunk size x queue depth.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import queue
import subprocess
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from tasks.errors import ChecksumMismatch, ConfigError, PreconditionFailed, command_error
from tasks.proc import tail

CHUNK = 4 * 1024 * 1024
CODEC_SUFFIX = {"zstd": ".zst", "lz4": ".lz4", "gzip": ".gz", "none": ""}
ENC_MAGIC = b"GRVLENC1"
ENC_SUFFIX = ".enc"
_NONCE = 12
_TAG = 16


# ---------------------------------------------------------------- threads and queues

_DONE = object()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _offer(q: queue.Queue[Any], item: Any, stop: threading.Event) -> bool:
    """Put ``item`` into ``q`` unless the consumer stops first: True when it went in."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.2)
            return True
        except queue.Full:
            continue
    return False


def threaded(source: Iterable[bytes], depth: int = 4, name: str = "stage") -> Iterator[bytes]:
    """Run ``source`` in a thread, handing chunks over through a queue of ``depth`` slots."""
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    it = iter(source)

    def pump() -> None:
        try:
            for chunk in it:
                if not _offer(q, chunk, stop):
                    break
            item: Any = _DONE
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            item = _Failure(exc)
        finally:
            close = getattr(it, "close", None)
            if stop.is_set() and close is not None:
                close()
        _offer(q, item, stop)

    thread = threading.Thread(target=pump, name=f"gravl-{name}", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join(timeout=30)


# ---------------------------------------------------------------- sources


@dataclass
class ProcessSource:
    """Stream a subprocess's stdout; stderr is drained in the background and kept (tail only)."""

    proc: subprocess.Popen[bytes]
    label: str
    chunk_size: int = CHUNK
    stderr_lines: list[str] = field(default_factory=list)
    _drainer: threading.Thread | None = None

    def __post_init__(self) -> None:
        def drain() -> None:
            assert self.proc.stderr is not None
            for raw in self.proc.stderr:
                self.stderr_lines.append(raw.decode("utf-8", "replace").rstrip())
                if len(self.stderr_lines) > 400:
                    del self.stderr_lines[:200]

        self._drainer = threading.Thread(target=drain, daemon=True, name="stderr-drain")
        self._drainer.start()

    def __iter__(self) -> Iterator[bytes]:
        assert self.proc.stdout is not None
        read = self.proc.stdout.read
        try:
            while chunk := read(self.chunk_size):
                yield chunk
        finally:
            code = self.finish()
        if code != 0:
            raise command_error(
                f"{self.label} exited {code}: {tail(chr(10).join(self.stderr_lines)) or 'no message'}"
            )

    def finish(self, timeout: float = 60) -> int:
        """Wait for the process (killing it if the stream was abandoned) and return its code."""
        if self.proc.poll() is None and self.proc.stdout is not None and not self.proc.stdout.closed:
            # the consumer stopped early: do not leave a half-finished producer behind
            try:
                self.proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        if self._drainer is not None:
            self._drainer.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return code

    def stderr_text(self) -> str:
        return "\n".join(self.stderr_lines)


# ---------------------------------------------------------------- hashing


@dataclass
class Digest:
    """Running SHA-256 and byte count of a stream."""

    sha: Any = field(default_factory=hashlib.sha256)
    size: int = 0

    def hexdigest(self) -> str:
        return str(self.sha.hexdigest())


def hashed(source: Iterable[bytes], digest: Digest) -> Iterator[bytes]:
    for chunk in source:
        digest.sha.update(chunk)
        digest.size += len(chunk)
        yield chunk


def verified(source: Iterable[bytes], sha256: str, size: int, what: str) -> Iterator[bytes]:
    """Pass chunks through; at the end raise ChecksumMismatch unless size and SHA-256 match."""
    digest = Digest()
    for chunk in source:
        digest.sha.update(chunk)
        digest.size += len(chunk)
        if digest.size > size:
            raise ChecksumMismatch(f"{what}: larger than the {size} bytes recorded")
        yield chunk
    if digest.size != size:
        raise ChecksumMismatch(f"{what}: {digest.size} bytes, manifest says {size}")
    if digest.hexdigest() != sha256:
        raise ChecksumMismatch(f"{what}: SHA-256 mismatch (stored data is corrupt)")


def sized(source: Iterable[bytes], size: int, what: str) -> Iterator[bytes]:
    """Pass chunks through; raise ChecksumMismatch unless exactly ``size`` bytes came."""
    total = 0
    for chunk in source:
        total += len(chunk)
        if total > size:
            raise ChecksumMismatch(f"{what}: larger than the {size} bytes recorded")
        yield chunk
    if total != size:
        raise ChecksumMismatch(f"{what}: {total} bytes, manifest says {size}")


# ---------------------------------------------------------------- compression


def compress(
    source: Iterable[bytes], codec: str, level: int | None = None, threads: int | None = None
) -> Iterator[bytes]:
    """Compress a stream. ``threads``: zstd's worker threads (default: up to 4, one per core;
    0 compresses in the calling thread, for callers that already run several streams at once)."""
    if codec == "none":
        yield from source
        return
    comp: Any
    if codec == "zstd":
        import zstandard

        if threads is None:
            threads = max(1, min(4, os.cpu_count() or 1))
        comp = zstandard.ZstdCompressor(level=level or 3, threads=threads).compressobj()
        flush = comp.flush
    elif codec == "gzip":
        comp = zlib.compressobj(level or 6, zlib.DEFLATED, 31)
        flush = comp.flush
    elif codec == "lz4":
        import lz4.frame

        comp = lz4.frame.LZ4FrameCompressor(compression_level=level or 0)
        head = comp.begin()
        if head:
            yield head
        flush = comp.flush
    else:
        raise ConfigError(f"unknown compression codec {codec!r}")
    for chunk in source:
        out = comp.compress(chunk)
        if out:
            yield out
    last = flush()
    if last:
        yield last


class _IterReader:
    """A minimal file-like reader over an iterator of byte chunks (for zstandard's reader API)."""

    def __init__(self, source: Iterable[bytes]) -> None:
        self._it = iter(source)
        self._buf = b""

    def read(self, n: int = -1) -> bytes:
        while not self._buf:
            nxt = next(self._it, None)
            if nxt is None:
                return b""
            self._buf = nxt
        if n < 0 or n >= len(self._buf):
            out, self._buf = self._buf, b""
        else:
            out, self._buf = self._buf[:n], self._buf[n:]
        return out


def _zstd_chunks(source: Iterable[bytes], what: str) -> Iterator[bytes]:
    import zstandard

    reader = _IterReader(source)
    yield from zstandard.ZstdDecompressor().read_to_iter(
        reader,  # type: ignore[arg-type]  # duck-typed: only read() is used
        read_size=1 << 20,
        write_size=CHUNK,
    )
    if reader.read(1):
        raise ChecksumMismatch(f"{what}: data after the end of the zstd stream")


def _gzip_chunks(source: Iterable[bytes], what: str) -> Iterator[bytes]:
    zobj = zlib.decompressobj(31)
    for chunk in source:
        data = chunk
        while data:
            if zobj.eof:
                raise ChecksumMismatch(f"{what}: data after the end of the gzip stream")
            out = zobj.decompress(data, CHUNK)
            if out:
                yield out
            data = zobj.unconsumed_tail
    tail_bytes = zobj.flush()
    if tail_bytes:
        yield tail_bytes
    if not zobj.eof:
        raise ChecksumMismatch(f"{what}: truncated gzip stream")


def _lz4_chunks(source: Iterable[bytes], what: str) -> Iterator[bytes]:
    import lz4.frame

    lobj = lz4.frame.LZ4FrameDecompressor()
    for chunk in source:
        if not chunk:
            continue
        if lobj.eof:
            raise ChecksumMismatch(f"{what}: data after the end of the lz4 stream")
        out = lobj.decompress(chunk, max_length=CHUNK)
        if out:
            yield out
        while not lobj.needs_input and not lobj.eof:
            out = lobj.decompress(b"", max_length=CHUNK)
            if out:
                yield out
    if not lobj.eof:
        raise ChecksumMismatch(f"{what}: truncated lz4 stream")


_DECOMPRESSORS: dict[str, Callable[[Iterable[bytes], str], Iterator[bytes]]] = {
    "zstd": _zstd_chunks,
    "gzip": _gzip_chunks,
    "lz4": _lz4_chunks,
}


def decompress(source: Iterable[bytes], codec: str, what: str = "object") -> Iterator[bytes]:
    """Decompress with bounded output chunks: a highly compressed input (zero pages compress
    thousands of times) must not expand into one huge buffer. A truncated zstd stream ends
    early without an error here: callers verify the raw size and SHA-256 (``verified``)."""
    if codec == "none":
        yield from source
        return
    chunks = _DECOMPRESSORS.get(codec)
    if chunks is None:
        raise ConfigError(f"unknown compression codec {codec!r}")
    try:
        yield from chunks(source, what)
    except (zlib.error, RuntimeError) as exc:
        raise ChecksumMismatch(f"{what}: cannot decompress ({exc})") from None
    except Exception as exc:
        if type(exc).__module__.startswith(("zstandard", "lz4")):
            raise ChecksumMismatch(f"{what}: cannot decompress ({exc})") from None
        raise


# ---------------------------------------------------------------- encryption (streaming AEAD)


def load_key(env_name: str | None) -> bytes | None:
    """The client-side key from the environment variable the config names (64 hex or base64)."""
    if not env_name:
        return None
    raw = os.environ.get(env_name)
    if not raw:
        raise ConfigError(f"repository.encryption_key_env: environment variable {env_name} is not set")
    raw = raw.strip()
    key: bytes | None = None
    try:
        if len(raw) == 64:
            key = bytes.fromhex(raw)
    except ValueError:
        key = None
    if key is None:
        try:
            key = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            key = None
    if key is None or len(key) != 32:
        raise ConfigError(
            f"repository.encryption_key_env: {env_name} must hold 32 bytes as 64 hex digits or base64"
        )
    return key


def key_fingerprint(key: bytes) -> str:
    """A non-secret identifier of a key, so restore can tell a wrong key from corrupt data."""
    return hashlib.sha256(b"gravl-dr key id:" + key).hexdigest()[:16]


# Format v2 (written since issue 9): ENC_MAGIC_V2, then Tink's streaming AEAD
# AES256_GCM_HKDF with 1 MiB ciphertext segments (Hoang-Reyhanitabar-Rogaway-Vizar STREAM: a
# random salt derives a per-object key by HKDF; every segment is its own AES-GCM message whose
# nonce holds the segment number and a last-segment flag). Each segment is authenticated before
# its plaintext is released, so truncation, reordering, a dropped last segment or a wrong key
# fail before any unverified byte is used, and an object can hold 2**32 segments (~4 PiB), not
# the ~64 GiB one GCM nonce covers. Format v1 (ENC_MAGIC, one AES-GCM stream per object) is
# still read, for backups and WAL written before.
ENC_MAGIC_V2 = b"GRVLENC2"
STREAM_ALG: Final = "tink-aes256-gcm-hkdf-1mib"  # manifest and WAL header name of format v2
LEGACY_ALG = "aes-256-gcm"  # format v1
SEGMENT_SIZE = 1 << 20  # ciphertext segment size of format v2 (fixed: it is not in the header)
_AAD = b"gravl-dr encrypted object v2"
_GCM_MAX_PLAINTEXT = (2**32 - 2) * 16  # NIST SP 800-38D: per GCM invocation (one nonce)


def _stream_aead(key: bytes, segment_size: int = SEGMENT_SIZE) -> Any:
    """Tink's StreamingAead for our 32-byte key. The key Tink sees is derived by HKDF, so the
    master key is never used directly by two algorithms (WAL headers HMAC with it)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    from tink import cleartext_keyset_handle, streaming_aead
    from tink.proto import aes_gcm_hkdf_streaming_pb2 as pb
    from tink.proto import common_pb2, tink_pb2

    streaming_aead.register()
    ikm = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"gravl-dr streaming aead key v2"
    ).derive(key)
    params = pb.AesGcmHkdfStreamingParams(
        ciphertext_segment_size=segment_size, derived_key_size=32, hkdf_hash_type=common_pb2.SHA256
    )
    key_proto = pb.AesGcmHkdfStreamingKey(version=0, params=params, key_value=ikm)
    keyset = tink_pb2.Keyset(
        primary_key_id=1,
        key=[
            tink_pb2.Keyset.Key(
                key_data=tink_pb2.KeyData(
                    type_url="type.googleapis.com/google.crypto.tink.AesGcmHkdfStreamingKey",
                    value=key_proto.SerializeToString(),
                    key_material_type=tink_pb2.KeyData.SYMMETRIC,
                ),
                status=tink_pb2.ENABLED,
                key_id=1,
                output_prefix_type=tink_pb2.RAW,
            )
        ],
    )
    return cleartext_keyset_handle.from_keyset(keyset).primitive(streaming_aead.StreamingAead)


def segment_count(plain_size: int, segment_size: int = SEGMENT_SIZE) -> int:
    """How many segments (GCM messages, nonces) format v2 uses for ``plain_size`` bytes:
    Tink's first segment also carries the header (1 + 32 salt + 7 nonce-prefix bytes)."""
    first = segment_size - 16 - 40
    rest = segment_size - 16
    if plain_size <= first:
        return 1
    return 1 + -(-(plain_size - first) // rest)


def max_object_size(segment_size: int = SEGMENT_SIZE) -> int:
    """The largest plaintext one format-v2 object can hold (segment numbers are 32 bits)."""
    return (segment_size - 16 - 40) + (2**32 - 2) * (segment_size - 16)


class _Collect(io.RawIOBase):
    """Where Tink's encrypting stream writes: ciphertext parts, taken by ``encrypt``."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.parts.append(bytes(b))
        return len(b)

    def take(self) -> bytes:
        out = b"".join(self.parts)
        self.parts.clear()
        return out


class ChunkReader(io.RawIOBase):
    """A readable raw file over an iterator of byte chunks (what Tink's decrypting stream reads)."""

    def __init__(self, source: Iterable[bytes], head: bytes = b"") -> None:
        super().__init__()
        self._it = iter(source)
        self._buf = memoryview(head)

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf:
            nxt = next(self._it, None)
            if nxt is None:
                return 0
            self._buf = memoryview(nxt)
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def encrypt(source: Iterable[bytes], key: bytes) -> Iterator[bytes]:
    """Encrypt a stream in format v2 (segmented streaming AEAD); output comes as it is made."""
    from tink import TinkError

    sink = _Collect()
    yield ENC_MAGIC_V2
    try:
        enc = _stream_aead(key).new_encrypting_stream(sink, _AAD)
        for chunk in source:
            view = memoryview(chunk)
            while view:
                view = view[enc.write(view) :]
            out = sink.take()
            if out:
                yield out
        enc.close()  # writes the last segment, flagged as last
    except TinkError as exc:
        raise ChecksumMismatch(f"encryption failed: {exc}") from None
    yield sink.take()


def encryption_format(head: bytes) -> str | None:
    """``STREAM_ALG`` or ``LEGACY_ALG`` from an object's first bytes, None if neither."""
    if head.startswith(ENC_MAGIC_V2):
        return STREAM_ALG
    if head.startswith(ENC_MAGIC):
        return LEGACY_ALG
    return None


def decrypt(source: Iterable[bytes], key: bytes, what: str = "object") -> Iterator[bytes]:
    """Decrypt as a stream. Format v2: every chunk yielded has been authenticated (its segment's
    tag checked) and the end of the object is authenticated too; a wrong key, a corrupt,
    truncated or reordered object raises ChecksumMismatch before any bad byte is yielded.
    Format v1 (legacy): the GCM tag is only checked at the end, so callers verify the stored
    SHA-256 of the whole object before trusting any plaintext."""
    head = b""
    it = iter(source)
    for chunk in it:
        head += chunk
        if len(head) >= len(ENC_MAGIC) + _NONCE:
            break
    if head.startswith(ENC_MAGIC_V2):
        yield from _decrypt_v2(head[len(ENC_MAGIC_V2) :], it, key, what)
        return
    yield from _decrypt_v1(head, it, key, what)


def _decrypt_v2(head: bytes, it: Iterator[bytes], key: bytes, what: str) -> Iterator[bytes]:
    from tink import TinkError

    try:
        dec = _stream_aead(key).new_decrypting_stream(ChunkReader(it, head), _AAD)
        while True:
            out = dec.read(SEGMENT_SIZE)  # a segment at a time: released as soon as it is verified
            if not out:
                return
            yield out
    except TinkError as exc:
        text = str(exc)
        if "No matching key" in text:
            raise ChecksumMismatch(
                f"{what}: authentication failed at its first segment (wrong key or corrupt data)"
            ) from None
        raise ChecksumMismatch(
            f"{what}: authentication failed (the encrypted object is corrupt, truncated or reordered)"
        ) from None


def _decrypt_v1(head: bytes, it: Iterator[bytes], key: bytes, what: str) -> Iterator[bytes]:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    if not head.startswith(ENC_MAGIC) or len(head) < len(ENC_MAGIC) + _NONCE:
        raise ChecksumMismatch(f"{what}: not a gravl-dr encrypted object")
    nonce = head[len(ENC_MAGIC) : len(ENC_MAGIC) + _NONCE]
    pending = head[len(ENC_MAGIC) + _NONCE :]
    dec = Cipher(algorithms.AES(key), modes.GCM(nonce)).decryptor()
    for chunk in it:
        pending += chunk
        if len(pending) > _TAG:
            out = dec.update(pending[:-_TAG])
            pending = pending[-_TAG:]
            if out:
                yield out
    if len(pending) > _TAG:
        out = dec.update(pending[:-_TAG])
        pending = pending[-_TAG:]
        if out:
            yield out
    if len(pending) < _TAG:
        raise ChecksumMismatch(f"{what}: truncated encrypted object")
    try:
        yield dec.finalize_with_tag(pending)
    except InvalidTag:
        raise ChecksumMismatch(f"{what}: authentication failed (wrong key or corrupt data)") from None


def encrypt_v1(source: Iterable[bytes], key: bytes) -> Iterator[bytes]:
    """Format v1 (one AES-GCM stream per object). Not written any more; kept so tests can make
    the objects that earlier versions wrote and prove they are still read."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    nonce = os.urandom(_NONCE)
    enc = Cipher(algorithms.AES(key), modes.GCM(nonce)).encryptor()
    yield ENC_MAGIC + nonce
    for chunk in source:
        out = enc.update(chunk)
        if out:
            yield out
    yield enc.finalize() + enc.tag


# ---------------------------------------------------------------- pipelines


@dataclass
class EncodeResult:
    raw: Digest
    stored: Digest


def encode(
    source: Iterable[bytes],
    codec: str,
    key: bytes | None,
    level: int | None = None,
) -> tuple[Iterator[bytes], EncodeResult]:
    """raw -> sha(raw) -> compress -> (encrypt) -> sha(stored), with stages in threads."""
    result = EncodeResult(Digest(), Digest())
    stage: Iterable[bytes] = threaded(source, depth=4, name="source")
    stage = compress(hashed(stage, result.raw), codec, level)
    if key is not None:
        stage = encrypt(stage, key)
    stage = threaded(hashed(stage, result.stored), depth=4, name="encode")
    return iter(stage), result


def decode(
    source: Iterable[bytes],
    codec: str,
    key: bytes | None,
    encrypted: bool,
    what: str,
) -> Iterator[bytes]:
    stage: Iterable[bytes] = threaded(source, depth=4, name="fetch")
    if encrypted:
        if key is None:
            raise PreconditionFailed(f"{what} is encrypted: set repository.encryption_key_env")
        stage = decrypt(stage, key, what)
    return iter(decompress(stage, codec, what))


def consume(source: Iterable[bytes], sink: Callable[[bytes], Any] | None = None) -> int:
    n = 0
    for chunk in source:
        if sink is not None:
            sink(chunk)
        n += len(chunk)
    return n
