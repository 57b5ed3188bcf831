"""Backups through the real flow, both kinds, both backends: restored data equals the source."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Unpack

import pytest

from flows.backup import backup_flow
from tasks.backup import list_backups, resolve_backup
from tasks.config import load_config
from tasks.pgcluster import LocalCluster, free_port
from tasks.postgres import database_digest
from tasks.repository import PutResult, S3Repository, open_repository
from tasks.restore import restore_logical, restore_physical, set_port
from tasks.sample import create_database

if TYPE_CHECKING:
    from mypy_boto3_s3.type_defs import UploadPartOutputTypeDef, UploadPartRequestTypeDef

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _restore_and_compare_physical(cfg_path: Path, pg_primary: LocalCluster, pg_dir: Path) -> None:
    cfg = load_config(str(cfg_path))
    repo = open_repository(cfg.repository)
    manifest = resolve_backup(repo, "latest", kind="physical")
    target = pg_dir / "restored"
    restore_physical(cfg, repo, manifest, target)
    port = free_port()
    set_port(target, port, "postgres")
    restored = LocalCluster(target, port, dbname="gravl")
    try:
        restored.start()
        assert database_digest(restored.dsn()) == database_digest(pg_primary.dsn())
    finally:
        restored.destroy()


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_physical_backup_round_trip(
    backend: str,
    make_config: Callable[..., Path],
    file_repo_url: str,
    s3_repo_url: str,
    moto_endpoint: str,
    pg_primary: LocalCluster,
    pg_dir: Path,
) -> None:
    # GIVEN a repository on disk or on S3
    url = file_repo_url if backend == "file" else s3_repo_url
    cfg_path = make_config(
        url,
        moto=moto_endpoint,
        repository={"storage_class": "STANDARD_IA", "sse": "AES256"} if backend == "s3" else {},
    )
    # WHEN a physical backup runs through the flow
    report = backup_flow(config_path=str(cfg_path), kind="physical")
    # THEN it is listed with a manifest that records WAL positions and row counts
    repo = open_repository(load_config(str(cfg_path)).repository)
    [manifest] = list_backups(repo)
    assert manifest.id == report.backup_id and manifest.kind == "physical"
    assert manifest.start_lsn and manifest.stop_lsn and manifest.start_wal and manifest.stop_wal
    assert manifest.row_counts["gravl"]["public.workout_logs"] == 5000
    assert report.stored_bytes == manifest.stored_bytes < manifest.raw_bytes
    if backend == "s3":  # storage class and SSE reached S3
        assert isinstance(repo, S3Repository)
        head = repo.client.head_object(
            Bucket=repo.bucket, Key=f"gravl/backups/{manifest.id}/{manifest.objects[0].key}"
        )
        assert head["StorageClass"] == "STANDARD_IA" and head["ServerSideEncryption"] == "AES256"
    # AND the restored cluster holds exactly the source's data
    _restore_and_compare_physical(cfg_path, pg_primary, pg_dir)


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_logical_backup_round_trip(
    backend: str,
    make_config: Callable[..., Path],
    file_repo_url: str,
    s3_repo_url: str,
    moto_endpoint: str,
    pg_primary: LocalCluster,
    cluster_factory: Callable[..., LocalCluster],
) -> None:
    url = file_repo_url if backend == "file" else s3_repo_url
    cfg_path = make_config(url, moto=moto_endpoint)
    report = backup_flow(config_path=str(cfg_path), kind="logical")
    cfg = load_config(str(cfg_path))
    repo = open_repository(cfg.repository)
    manifest = resolve_backup(repo, report.backup_id)
    assert manifest.row_counts_exact and manifest.row_counts["gravl"]["public.users"] == 200
    # WHEN restored into an empty database of another cluster
    target = cluster_factory()
    create_database(target.dsn("postgres"), "gravl")
    restore_logical(cfg, repo, manifest, target.dsn("gravl"), jobs=2)
    # THEN every table's content equals the source
    assert database_digest(target.dsn("gravl")) == database_digest(pg_primary.dsn())


def test_dry_run_writes_nothing(
    make_config: Callable[..., Path], file_repo_url: str, file_repo_dir: Path
) -> None:
    cfg_path = make_config(file_repo_url)
    report = backup_flow(config_path=str(cfg_path), kind="physical", dry_run=True)
    assert report.dry_run and report.stored_bytes == 0
    assert not any(p.is_file() for p in file_repo_dir.rglob("*"))


def test_encrypted_backup_round_trip_and_wrong_key(
    make_config: Callable[..., Path],
    file_repo_url: str,
    file_repo_dir: Path,
    pg_primary: LocalCluster,
    pg_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import os

    from gravl_testlib import assert_one_line_error, run_cli, take_backup

    # GIVEN a repository with client-side encryption, the key in an environment variable
    key = os.urandom(32).hex()
    monkeypatch.setenv("GRAVL_TEST_KEY", key)
    cfg_path = make_config(file_repo_url, repository={"encryption_key_env": "GRAVL_TEST_KEY"})
    cfg = load_config(str(cfg_path))
    repo = open_repository(cfg.repository)
    manifest = take_backup(cfg, repo, "physical")
    # THEN the stored object is not readable without the key, and the key is nowhere in the repo
    stored = next(p for p in file_repo_dir.rglob("base.tar*"))
    assert stored.name.endswith(".zst.enc") and manifest.encryption == "tink-aes256-gcm-hkdf-1mib"
    for path in file_repo_dir.rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes()
    # AND verify with the right key passes, with another key it fails naming the problem
    assert run_cli("verify", "latest", config=cfg_path, env={"GRAVL_TEST_KEY": key}).returncode == 0
    proc = run_cli("verify", "latest", config=cfg_path, env={"GRAVL_TEST_KEY": os.urandom(32).hex()})
    assert_one_line_error(proc, "encrypted with another key")
    assert key not in proc.stderr
    # AND the restore with the key equals the source
    _restore_and_compare_physical(cfg_path, pg_primary, pg_dir)


def test_transient_s3_error_is_retried_cleanly(
    make_config: Callable[..., Path], s3_repo_url: str, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from botocore.exceptions import ClientError

    # GIVEN an S3 endpoint whose first multipart upload fails at its second part with a 500
    cfg_path = make_config(s3_repo_url, moto=moto_endpoint, repository={"compression": "none"})
    real_put_stream = S3Repository.put_stream
    attempts: list[str] = []

    def flaky_put_stream(self: S3Repository, key: str, chunks: Iterable[bytes]) -> PutResult:
        attempts.append(key)
        if "/base.tar" in key and len([k for k in attempts if "/base.tar" in k]) == 1:
            real_upload: Callable[..., UploadPartOutputTypeDef] = self.client.upload_part  # client: Any

            def upload_part(**kwargs: Unpack[UploadPartRequestTypeDef]) -> UploadPartOutputTypeDef:
                if kwargs["PartNumber"] == 2:
                    raise ClientError(
                        {
                            "Error": {"Code": "InternalError", "Message": "injected"},
                            "ResponseMetadata": {
                                "RequestId": "r",
                                "HostId": "h",
                                "HTTPStatusCode": 500,
                                "HTTPHeaders": {},
                                "RetryAttempts": 0,
                            },
                        },
                        "UploadPart",
                    )
                return real_upload(**kwargs)

            monkeypatch.setattr(self.client, "upload_part", upload_part)
            try:
                return real_put_stream(self, key, chunks)
            finally:
                monkeypatch.setattr(self.client, "upload_part", real_upload)
        return real_put_stream(self, key, chunks)

    monkeypatch.setattr(S3Repository, "put_stream", flaky_put_stream)
    # WHEN the backup flow runs
    report = backup_flow(config_path=str(cfg_path), kind="physical")
    # THEN the stream step was retried from the start and exactly one clean backup exists
    data_attempts = [k for k in attempts if "/base.tar" in k]
    assert len(data_attempts) == 2 and data_attempts[0] == data_attempts[1]
    repo = open_repository(load_config(str(cfg_path)).repository)
    assert [m.id for m in list_backups(repo)] == [report.backup_id]
    assert isinstance(repo, S3Repository) and repo.list_incomplete() == []
