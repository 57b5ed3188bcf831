"""Pure logic and stream stages: table-driven, no servers needed."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from tasks.config import parse_config
from tasks.errors import AlreadyExists, ChecksumMismatch, ConfigError, PreconditionFailed
from tasks.models import format_lsn, parse_lsn, wal_file_name, wal_name_from_segno, wal_segno
from tasks.repository import FileRepository
from tasks.streams import compress, decode, decompress, encode, key_fingerprint, load_key, verified

BASE = {"primary": {"dsn": "host=127.0.0.1 dbname=x"}, "repository": {"url": "file:///tmp/x"}}


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"bogus": 1}, "unknown key 'bogus'"),
        ({"repository": {"url": "ftp://x"}}, "repository.url"),
        ({"repository": {"url": "file:///x", "compression": "brotli"}}, "repository.compression"),
        ({"primary": {"dsn": "host='unterminated"}}, "primary.dsn"),
        ({"primary": {}}, "missing key 'primary.dsn'"),
        ({"dns": {"provider": "route53", "ttl": -1}}, "dns.ttl"),
        ({"cluster": "Bad Name"}, "cluster"),
        ({"replicas": [{"name": "r1", "dsn": "host=a", "color": "red"}]}, "replicas.0.color"),
    ],
)
def test_config_rejects_naming_the_key(patch: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("'", ".")):
        parse_config({**BASE, **patch})


def test_config_accepts_design_example() -> None:
    cfg = parse_config(
        {
            **BASE,
            "repository": {
                "url": "s3://gravl-backups-eu-north-1/gravl",
                "endpoint_url": "http://127.0.0.1:5000",
                "region": "eu-north-1",
                "storage_class": "STANDARD_IA",
                "sse": "AES256",
                "compression": "zstd",
                "encryption_key_env": "GRAVL_DR_KEY",
            },
            "retention": {"full_days": 30, "min_full": 2},
            "dns": {"provider": "route53", "zone_id": "Z123", "record": "db.gravl.internal.", "ttl": 30},
            "metrics": {"pushgateway": "http://127.0.0.1:9091"},
            "reconnect": [
                {"command": ["true"]},
                {"webhook": "https://ops.example/hooks"},
                {"kubernetes": {"namespace": "gravl-prod", "deployments": ["gravl-api"]}},
            ],
            "postgres": {"bindir": "auto", "os_user": "postgres"},
        }
    )
    assert cfg.repository.sse == "AES256" and cfg.reconnect[2].kubernetes is not None


@pytest.mark.parametrize(
    ("lsn", "tli", "name"),
    [
        ("0/2000028", 1, "000000010000000000000002"),
        ("1/FF000000", 3, "0000000300000001000000FF"),
        ("A/1", 16, "000000100000000A00000000"),
    ],
)
def test_wal_names(lsn: str, tli: int, name: str) -> None:
    value = parse_lsn(lsn)
    assert format_lsn(value) == lsn
    assert wal_file_name(tli, value) == name
    t, segno = wal_segno(name)
    assert t == tli and wal_name_from_segno(t, segno) == name


@pytest.mark.parametrize("codec", ["zstd", "lz4", "gzip", "none"])
def test_codec_round_trip(codec: str) -> None:
    data = [os.urandom(1000) + bytes(100_000) for _ in range(5)]
    out = b"".join(decompress(compress(iter(data), codec), codec))
    assert out == b"".join(data)


@pytest.mark.parametrize("codec", ["zstd", "lz4", "gzip"])
def test_truncated_stream_is_detected(codec: str) -> None:
    raw = os.urandom(50_000) + bytes(3_000_000)
    stored = b"".join(compress(iter([raw]), codec))
    digest = hashlib.sha256(raw).hexdigest()
    with pytest.raises(ChecksumMismatch):
        b"".join(verified(decompress(iter([stored[: len(stored) // 2]]), codec), digest, len(raw), "x"))


@pytest.mark.parametrize("codec", ["zstd", "lz4", "gzip"])
def test_decompressed_chunks_stay_bounded(codec: str) -> None:
    # 64 MiB of zeros compress to a few KiB: output must still come in bounded chunks
    stored = b"".join(compress(iter([bytes(4 << 20)] * 16), codec))
    sizes = [len(c) for c in decompress(iter([stored]), codec)]
    assert sum(sizes) == 64 << 20 and max(sizes) <= 4 << 20


def test_encrypted_pipeline_round_trip_and_wrong_key() -> None:
    key, other = os.urandom(32), os.urandom(32)
    data = [os.urandom(70_000) for _ in range(4)]
    stream, result = encode(iter(data), "zstd", key)
    stored = b"".join(stream)
    assert result.raw.size == sum(map(len, data)) and result.stored.size == len(stored)
    assert b"".join(decode(iter([stored]), "zstd", key, True, "x")) == b"".join(data)
    with pytest.raises(ChecksumMismatch):  # garbage plaintext or the GCM tag: never silent
        b"".join(decode(iter([stored]), "zstd", other, True, "x"))
    with pytest.raises(ChecksumMismatch, match="authentication failed"):
        b"".join(decode(iter([stored]), "none", other, True, "x"))
    assert key_fingerprint(key) != key_fingerprint(other)


def test_load_key_formats(monkeypatch: pytest.MonkeyPatch) -> None:
    key = os.urandom(32)
    monkeypatch.setenv("K_HEX", key.hex())
    import base64

    monkeypatch.setenv("K_B64", base64.b64encode(key).decode())
    monkeypatch.setenv("K_BAD", "short")
    assert load_key("K_HEX") == key == load_key("K_B64")
    with pytest.raises(ConfigError, match="K_BAD must hold 32 bytes"):
        load_key("K_BAD")
    with pytest.raises(ConfigError, match="K_UNSET is not set"):
        load_key("K_UNSET")


def test_file_repository_never_overwrites(tmp_path: Path) -> None:
    repo = FileRepository(tmp_path, f"file://{tmp_path}")
    repo.put_bytes("a/b.txt", b"one")
    with pytest.raises(AlreadyExists):
        repo.put_bytes("a/b.txt", b"two")
    assert repo.get_bytes("a/b.txt") == b"one"
    assert repo.list_keys("a") == ["a/b.txt"]
    with pytest.raises(PreconditionFailed, match="invalid object key"):
        repo.put_bytes("../escape", b"x")


def test_s3_repository_never_overwrites(moto_endpoint: str, s3_bucket: str) -> None:
    from tasks.config import RepositoryConfig
    from tasks.repository import S3Repository

    repo = S3Repository(
        RepositoryConfig(
            url=f"s3://{s3_bucket}/p", endpoint_url=moto_endpoint, region="eu-north-1", part_size_mb=5
        )
    )
    big = os.urandom(11 * 1024 * 1024)  # three parts
    res = repo.put_stream("x/big", iter([big[i : i + 1_000_000] for i in range(0, len(big), 1_000_000)]))
    assert res.size == len(big) and repo.get_bytes("x/big") == big
    with pytest.raises(AlreadyExists):
        repo.put_bytes("x/big", b"other")
    assert repo.size("x/big") == len(big)
    assert repo.list_keys("x") == ["x/big"]
