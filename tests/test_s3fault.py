"""The fault-injecting S3 proxy itself: each action does what its docstring says (moto behind)."""

from __future__ import annotations

import pytest
from s3fault import S3FaultProxy

from tasks.config import RepositoryConfig
from tasks.errors import AlreadyExists, NotFound, StorageUnavailable
from tasks.repository import S3Repository


def _repo(proxy: S3FaultProxy, bucket: str) -> S3Repository:
    return S3Repository(
        RepositoryConfig(
            url=f"s3://{bucket}/gravl", endpoint_url=proxy.url, region="eu-north-1", part_size_mb=5
        )
    )


def test_forwards_untouched(s3_fault_proxy: S3FaultProxy, s3_bucket: str) -> None:
    repo = _repo(s3_fault_proxy, s3_bucket)
    repo.put_bytes("a/b.txt", b"hello")
    assert repo.get_bytes("a/b.txt") == b"hello"
    assert repo.size("a/b.txt") == 5
    assert repo.list_keys("a") == ["a/b.txt"]
    assert [r[0] for r in s3_fault_proxy.requests(key=r"a/b\.txt")][:1] == ["HEAD"]


def test_error_once_is_retried_by_the_sdk(s3_fault_proxy: S3FaultProxy, s3_bucket: str) -> None:
    repo = _repo(s3_fault_proxy, s3_bucket)
    rule = s3_fault_proxy.add("PUT", r"x\.bin$", action="error", status=503, code="SlowDown")
    repo.put_bytes("x.bin", b"1")
    assert rule.shots == 1 and repo.get_bytes("x.bin") == b"1"


def test_error_forever_surfaces_as_unavailable(s3_fault_proxy: S3FaultProxy, s3_bucket: str) -> None:
    repo = _repo(s3_fault_proxy, s3_bucket)
    s3_fault_proxy.add("GET", r"y\.bin$", action="error", status=500, code="InternalError", times=None)
    repo.put_bytes("y.bin", b"1")
    with pytest.raises(StorageUnavailable):
        repo.get_bytes("y.bin")


def test_head_ok_then_get_404(s3_fault_proxy: S3FaultProxy, s3_bucket: str) -> None:
    repo = _repo(s3_fault_proxy, s3_bucket)
    repo.put_bytes("z.bin", b"1")
    s3_fault_proxy.add("GET", r"z\.bin$", action="error", status=404, code="NoSuchKey")
    assert repo.exists("z.bin")
    with pytest.raises(NotFound):
        repo.get_bytes("z.bin")


def test_lost_reply_applies_the_write(s3_fault_proxy: S3FaultProxy, s3_bucket: str) -> None:
    # the SDK retries after the reset; the retry meets If-None-Match and is refused
    repo = _repo(s3_fault_proxy, s3_bucket)
    s3_fault_proxy.add("PUT", r"w\.bin$", action="lost_reply")
    with pytest.raises(AlreadyExists):
        repo.put_bytes("w.bin", b"written")
    assert repo.get_bytes("w.bin") == b"written"
    assert any(r[3].startswith("lost_reply") for r in s3_fault_proxy.requests("PUT", r"w\.bin$"))


def test_drop_and_delay(s3_fault_proxy: S3FaultProxy, s3_bucket: str) -> None:
    import time

    repo = _repo(s3_fault_proxy, s3_bucket)
    drop = s3_fault_proxy.add("PUT", r"d\.bin$", action="drop")
    repo.put_bytes("d.bin", b"1")  # the SDK retries a dropped connection
    assert drop.shots == 1 and repo.get_bytes("d.bin") == b"1"
    s3_fault_proxy.add("GET", r"d\.bin$", action="delay", delay=0.5)
    t0 = time.monotonic()
    assert repo.get_bytes("d.bin") == b"1"
    assert time.monotonic() - t0 >= 0.5
