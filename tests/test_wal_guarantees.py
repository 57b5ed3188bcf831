"""WAL archive guarantees of issue 9: a name is never archived twice with different content,
whatever the configuration when it was pushed (item 3), and wal-fetch exits 1 only when a name
is truly not in the archive (item 5). Through the real `gravl-dr` command."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from s3fault import S3FaultProxy
from test_wal_contract import fetch, make_wal, push, seg_name

from gravl_testlib import assert_one_line_error, write_config

KEY_ENV = {"GRAVL_DR_TEST_KEY": "33" * 32}


@pytest.fixture
def pg_wal() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="gravl-test-pgwal-", dir="/tmp"))
    (base / "pg_wal" / "archive_status").mkdir(parents=True)
    yield base / "pg_wal"
    shutil.rmtree(base, ignore_errors=True)


def _config(path: Path, url: str, **repository: Any) -> Path:
    return write_config(
        path,
        {
            "cluster": "gravl",
            "primary": {"dsn": "host=127.0.0.1 port=1 user=postgres"},
            "repository": {"url": url, **repository},
        },
    )


def _objects(repo: Path, name: str) -> list[str]:
    return sorted(p.name for p in repo.glob(f"wal/*/{name}*"))


# ---------------------------------------------------------------- item 3: overwrite across variants


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ({"compression": "zstd"}, {"compression": "gzip"}),
        ({"compression": "lz4"}, {"compression": "none"}),
        ({"compression": "zstd"}, {"compression": "zstd", "encryption_key_env": "GRAVL_DR_TEST_KEY"}),
        ({"compression": "gzip", "encryption_key_env": "GRAVL_DR_TEST_KEY"}, {"compression": "zstd"}),
    ],
    ids=["zstd-then-gzip", "lz4-then-none", "plain-then-encrypted", "encrypted-then-plain"],
)
def test_different_content_is_refused_under_any_codec_or_encryption(
    pg_wal: Path, tmp_path: Path, file_repo_dir: Path, first: dict[str, str], second: dict[str, str]
) -> None:
    (file_repo_dir / "backups").mkdir()
    url = f"file://{file_repo_dir}"
    before = _config(tmp_path / "before.yaml", url, **first)
    after = _config(tmp_path / "after.yaml", url, **second)
    # GIVEN a segment archived under the first configuration
    name = seg_name(1, 7)
    path = make_wal(pg_wal, name, seed=7, ready=False)
    original = path.read_bytes()
    assert push(before, path, env=KEY_ENV).returncode == 0
    stored = _objects(file_repo_dir, name)
    assert len(stored) == 1
    # WHEN the configuration changes and a file with other bytes is pushed under that name
    make_wal(pg_wal, name, seed=8, ready=False)
    proc = push(after, path, env=KEY_ENV)
    # THEN it is refused with one line, nothing new is stored ...
    assert_one_line_error(proc, name, "kept")
    assert _objects(file_repo_dir, name) == stored
    # ... and wal-fetch returns the original bytes under either configuration (that has the key)
    readers = (
        [before] if "encryption_key_env" in first and "encryption_key_env" not in second else [before, after]
    )
    for config in readers:
        dest = tmp_path / f"dest-{config.stem}"
        got = fetch(config, name, dest, "--prefetch", "0", env=KEY_ENV)
        assert got.returncode == 0, got.stderr
        assert dest.read_bytes() == original


def test_identical_content_under_another_codec_is_a_success_and_stores_nothing(
    pg_wal: Path, tmp_path: Path, file_repo_dir: Path
) -> None:
    (file_repo_dir / "backups").mkdir()
    url = f"file://{file_repo_dir}"
    name = seg_name(1, 9)
    path = make_wal(pg_wal, name, seed=9, ready=False)
    assert push(_config(tmp_path / "a.yaml", url, compression="zstd"), path).returncode == 0
    # WHEN the same bytes are pushed again after switching to gzip and encryption
    for i, repo_cfg in enumerate(
        ({"compression": "gzip"}, {"compression": "lz4", "encryption_key_env": "GRAVL_DR_TEST_KEY"})
    ):
        proc = push(_config(tmp_path / f"b{i}.yaml", url, **repo_cfg), path, env=KEY_ENV)
        # THEN it succeeds (PostgreSQL may retry a file it already archived) and adds no copy
        assert proc.returncode == 0, proc.stderr
    assert _objects(file_repo_dir, name) == [f"{name}.zst"]


def test_encrypted_copy_without_the_key_is_refused_not_overwritten(
    pg_wal: Path, tmp_path: Path, file_repo_dir: Path
) -> None:
    (file_repo_dir / "backups").mkdir()
    url = f"file://{file_repo_dir}"
    name = seg_name(1, 10)
    path = make_wal(pg_wal, name, seed=10, ready=False)
    enc = _config(tmp_path / "enc.yaml", url, encryption_key_env="GRAVL_DR_TEST_KEY")
    assert push(enc, path, env=KEY_ENV).returncode == 0
    proc = push(_config(tmp_path / "plain.yaml", url), path)
    assert_one_line_error(proc, name, "cannot be compared", "kept")
    assert _objects(file_repo_dir, name) == [f"{name}.zst.enc"]


def test_s3_different_content_after_a_codec_change_is_refused(
    pg_wal: Path, tmp_path: Path, moto_endpoint: str, s3_bucket: str
) -> None:
    url = f"s3://{s3_bucket}/gravl"
    common = {"endpoint_url": moto_endpoint, "region": "eu-north-1"}
    name = seg_name(1, 11)
    path = make_wal(pg_wal, name, seed=11, ready=False)
    assert push(_config(tmp_path / "z.yaml", url, compression="zstd", **common), path).returncode == 0
    make_wal(pg_wal, name, seed=12, ready=False)
    gz = _config(tmp_path / "g.yaml", url, compression="gzip", **common)
    assert_one_line_error(push(gz, path), name, "different content")
    import boto3

    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="eu-north-1")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="gravl/wal/").get("Contents", [])]
    assert [k for k in keys if name in k] == [f"gravl/wal/00000001/{name}.zst"]


def test_wal_check_reports_a_name_archived_twice_by_an_older_release(
    pg_wal: Path, tmp_path: Path, file_repo_dir: Path
) -> None:
    # GIVEN a repository where an older release stored a name under two codecs
    from gravl_testlib import run_cli

    (file_repo_dir / "backups").mkdir()
    config = _config(tmp_path / "c.yaml", f"file://{file_repo_dir}")
    name = seg_name(1, 12)
    assert push(config, make_wal(pg_wal, name, seed=12, ready=False)).returncode == 0
    folder = file_repo_dir / "wal" / "00000001"
    (folder / f"{name}.gz").write_bytes((folder / f"{name}.zst").read_bytes())
    # WHEN the archive is checked THEN it says so, naming both copies
    proc = run_cli("wal-check", "--no-server", "--json", config=config)
    assert proc.returncode != 0
    import json

    problems = json.loads(proc.stdout)["problems"]
    assert any(name in p and f"{name}.gz" in p and f"{name}.zst" in p for p in problems), problems


# ---------------------------------------------------------------- item 5: wal-fetch exit codes


def test_fetch_of_a_listed_object_that_then_404s_stops_recovery(
    pg_wal: Path, tmp_path: Path, moto_endpoint: str, s3_bucket: str, s3_fault_proxy: S3FaultProxy
) -> None:
    # GIVEN a segment archived on S3, and a proxy that answers its HEAD but 404s its GET (a
    # concurrent expire between the two, or an eventually consistent store)
    url = f"s3://{s3_bucket}/gravl"
    direct = _config(tmp_path / "direct.yaml", url, endpoint_url=moto_endpoint, region="eu-north-1")
    proxied = _config(tmp_path / "proxied.yaml", url, endpoint_url=s3_fault_proxy.url, region="eu-north-1")
    name = seg_name(1, 20)
    assert push(direct, make_wal(pg_wal, name, seed=20, ready=False)).returncode == 0
    s3_fault_proxy.add("GET", name, action="error", status=404, code="NoSuchKey", times=None)
    # WHEN recovery asks for it
    dest = tmp_path / "RECOVERYXLOG"
    proc = fetch(proxied, name, dest, "--prefetch", "0")
    # THEN the exit is > 125 (recovery stops), never 1 (which would end recovery early)
    assert proc.returncode > 125, (proc.returncode, proc.stderr)
    assert "listed" in proc.stderr and not dest.exists()
    # and a name that truly is not there still exits 1
    assert fetch(proxied, seg_name(1, 21), dest, "--prefetch", "0").returncode == 1


@pytest.mark.parametrize(
    ("status", "code"),
    [(503, "SlowDown"), (500, "InternalError"), (403, "AccessDenied"), (400, "ExpiredToken")],
)
def test_fetch_failures_other_than_missing_exit_above_125(
    pg_wal: Path,
    tmp_path: Path,
    moto_endpoint: str,
    s3_bucket: str,
    s3_fault_proxy: S3FaultProxy,
    status: int,
    code: str,
) -> None:
    url = f"s3://{s3_bucket}/gravl"
    direct = _config(tmp_path / "direct.yaml", url, endpoint_url=moto_endpoint, region="eu-north-1")
    proxied = _config(tmp_path / "proxied.yaml", url, endpoint_url=s3_fault_proxy.url, region="eu-north-1")
    name = seg_name(1, 30)
    assert push(direct, make_wal(pg_wal, name, seed=30, ready=False)).returncode == 0
    s3_fault_proxy.add("GET", name, action="error", status=status, code=code, times=None)
    proc = fetch(proxied, name, tmp_path / "d", "--prefetch", "0", env={"AWS_MAX_ATTEMPTS": "2"})
    assert proc.returncode > 125, (proc.returncode, proc.stderr)
