"""Client-side encryption (issue 9 item 14): a segmented streaming AEAD, authenticated segment
by segment, with no 64 GiB ceiling; objects written in the old single-GCM format still read."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tasks.errors import ChecksumMismatch
from tasks.streams import (
    ENC_MAGIC,
    ENC_MAGIC_V2,
    SEGMENT_SIZE,
    STREAM_ALG,
    decode,
    decrypt,
    encode,
    encrypt,
    encrypt_v1,
    encryption_format,
    max_object_size,
    segment_count,
)

pytestmark = pytest.mark.unit

KEY = bytes(range(32))
SEG_PLAIN = SEGMENT_SIZE - 16  # plaintext per segment after the first
FIRST_PLAIN = SEGMENT_SIZE - 16 - 40  # the first segment also carries Tink's 40-byte header


def _plain(n: int) -> bytes:
    return os.urandom(n)


def _encrypted(data: bytes) -> bytes:
    return b"".join(encrypt(iter([data[i : i + 700_000] for i in range(0, len(data), 700_000)]), KEY))


def _segments(blob: bytes) -> tuple[bytes, list[bytes]]:
    """(magic + first segment, the other segments) of a format-v2 object."""
    body = blob[len(ENC_MAGIC_V2) :]
    first = ENC_MAGIC_V2 + body[:SEGMENT_SIZE]
    rest = [body[i : i + SEGMENT_SIZE] for i in range(SEGMENT_SIZE, len(body), SEGMENT_SIZE)]
    return first, rest


def _released(blob: bytes, key: bytes = KEY) -> tuple[bytes, ChecksumMismatch | None]:
    """What decrypt yields before it fails (if it does)."""
    out = bytearray()
    try:
        for chunk in decrypt(iter([blob[i : i + 65536] for i in range(0, len(blob), 65536)]), key, "obj"):
            out += chunk
    except ChecksumMismatch as exc:
        return bytes(out), exc
    return bytes(out), None


def test_round_trip_across_segments_and_empty_object() -> None:
    data = _plain(3 * SEGMENT_SIZE + 12345)
    blob = _encrypted(data)
    assert blob.startswith(ENC_MAGIC_V2) and encryption_format(blob) == STREAM_ALG
    assert _released(blob) == (data, None)
    assert _released(b"".join(encrypt(iter([]), KEY))) == (b"", None)


def test_every_segment_is_its_own_aead_message_so_size_is_not_capped_at_64_gib() -> None:
    # GIVEN GCM's limit per nonce (2**32 - 2 blocks, ~64 GiB): the old format ran ONE GCM
    # stream over the whole object, so the cipher refused to go past it.
    gcm_limit = (2**32 - 2) * 16
    # WHEN a multi-segment object is encrypted
    n = 2 * SEGMENT_SIZE + 999
    blob = _encrypted(_plain(n))
    # THEN it carries one 16-byte tag per segment (a fresh nonce each: segment number and a
    # last-segment flag), so no single GCM message is larger than a segment ...
    segments = segment_count(n)
    assert segments == 3
    assert len(blob) == len(ENC_MAGIC_V2) + 40 + n + 16 * segments
    assert gcm_limit > SEGMENT_SIZE
    # ... and an object far beyond 64 GiB fits (simulated: 2**32 segment numbers, not bytes)
    assert max_object_size() > 1024 * gcm_limit
    assert segment_count(100 * 2**40) < 2**32


def test_wrong_key_releases_nothing() -> None:
    blob = _encrypted(_plain(SEGMENT_SIZE + 10))
    released, err = _released(blob, key=bytes(32))
    assert released == b"" and err is not None and "wrong key" in str(err)


def test_corrupt_segment_is_refused_before_its_plaintext_is_released() -> None:
    # GIVEN a 4-segment object whose third segment has one flipped bit
    data = _plain(FIRST_PLAIN + 3 * SEG_PLAIN)
    first, rest = _segments(_encrypted(data))
    bad = bytearray(rest[1])
    bad[100] ^= 1
    # WHEN it is decrypted as a stream
    released, err = _released(first + rest[0] + bytes(bad) + rest[2])
    # THEN only the authenticated segments before it came out, then the error
    assert err is not None and "authentication failed" in str(err)
    assert data[: FIRST_PLAIN + SEG_PLAIN].startswith(released)
    assert len(released) >= FIRST_PLAIN  # streaming: verified segments are not held back


def test_reordered_segments_are_refused() -> None:
    data = _plain(FIRST_PLAIN + 3 * SEG_PLAIN)
    first, rest = _segments(_encrypted(data))
    released, err = _released(first + rest[1] + rest[0] + rest[2])
    assert err is not None
    assert data[:FIRST_PLAIN].startswith(released)


def test_truncated_object_is_refused() -> None:
    data = _plain(FIRST_PLAIN + 2 * SEG_PLAIN + 5000)
    blob = _encrypted(data)
    for cut in (len(blob) - 1, len(blob) - 3000, len(ENC_MAGIC_V2) + 20):
        released, err = _released(blob[:cut])
        assert err is not None, cut
        assert data.startswith(released) and len(released) < len(data)


def test_dropped_last_segment_is_refused() -> None:
    # GIVEN an object that ends exactly on a segment boundary once its last segment is dropped:
    # every remaining segment is intact and authentic, only the last-segment flag is missing
    data = _plain(FIRST_PLAIN + 2 * SEG_PLAIN + 777)
    first, rest = _segments(_encrypted(data))
    released, err = _released(first + rest[0])
    # THEN it is refused, not taken for a shorter complete object
    assert err is not None
    assert data[: FIRST_PLAIN + SEG_PLAIN].startswith(released)


def test_appended_garbage_is_refused() -> None:
    blob = _encrypted(_plain(5000))
    _released_bytes, err = _released(blob + b"x" * 100)
    assert err is not None


def test_legacy_single_gcm_objects_still_decrypt() -> None:
    # GIVEN an object written by the previous release (format v1)
    data = _plain(300_000)
    old = b"".join(encrypt_v1(iter([data]), KEY))
    assert old.startswith(ENC_MAGIC) and encryption_format(old) == "aes-256-gcm"
    # THEN it still decrypts, and tampering is still caught at its end
    assert _released(old) == (data, None)
    tampered = bytearray(old)
    tampered[-1] ^= 1
    assert _released(bytes(tampered))[1] is not None


def test_pipeline_with_compression_round_trips_in_the_new_format() -> None:
    data = [os.urandom(70_000) for _ in range(20)]
    stream, result = encode(iter(data), "zstd", KEY)
    stored = b"".join(stream)
    assert stored.startswith(ENC_MAGIC_V2) and result.stored.size == len(stored)
    assert b"".join(decode(iter([stored]), "zstd", KEY, True, "x")) == b"".join(data)


def test_legacy_encrypted_wal_object_is_still_fetched(tmp_path: Path) -> None:
    # GIVEN a WAL segment archived by the previous release: header says aes-256-gcm, payload v1
    import json
    import struct

    import zstandard

    from tasks.repository import FileRepository
    from tasks.walarchive import fetch_file, object_key
    from tasks.walformat import HEADER_MAGIC, RawDigest, WalSettings, build_header

    name = "000000010000000000000003"
    raw = os.urandom(200_000)
    settings = WalSettings(codec="zstd", key=KEY)
    digest = RawDigest(KEY)
    digest.update(raw)
    doc = json.loads(build_header(name, settings, digest.hexdigest(), len(raw))[8:])
    doc["encryption"] = "aes-256-gcm"
    body = json.dumps(doc).encode()
    header = HEADER_MAGIC + struct.pack("<I", len(body)) + body
    payload = b"".join(encrypt_v1(iter([zstandard.ZstdCompressor().compress(raw)]), KEY))
    repo = FileRepository(tmp_path / "repo", f"file://{tmp_path}/repo")
    repo.put_bytes(object_key(name, "zstd", True), header + payload)
    # WHEN it is fetched under today's settings THEN the bytes come back verified
    fetch_file(repo, name, tmp_path / "out", settings)
    assert (tmp_path / "out").read_bytes() == raw


def test_legacy_encrypted_backup_object_still_decodes_through_the_restore_pipeline() -> None:
    # a backup object of the previous release: zstd, then one AES-GCM stream (format v1)
    from tasks.streams import compress

    data = [os.urandom(50_000) for _ in range(8)]
    old = b"".join(encrypt_v1(compress(iter(data), "zstd"), KEY))
    assert b"".join(
        decode(iter([old[i : i + 9999] for i in range(0, len(old), 9999)]), "zstd", KEY, True, "b")
    ) == b"".join(data)
