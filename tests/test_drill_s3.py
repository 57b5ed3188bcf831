"""A drill, and a restore with --start, from an encrypted S3 repository (moto over HTTP)
replaying archived WAL.

The restored server runs `gravl-dr wal-fetch` as its restore_command, as the postgres user: it
needs the AWS SDK's variables and the encryption key's variable, which subprocesses do not get
by default. The key's variable is deliberately not GRAVL_DR_-prefixed.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest
from drill_helpers import archive_backup_then_writes, assert_no_leftovers, check, failed_names

from flows.drill import drill_flow
from flows.restore import restore_flow
from gravl_testlib import write_config
from tasks.config import Config
from tasks.pgcluster import LocalCluster, chown_tree, free_port, make_private_dir
from tasks.postgres import connection
from tasks.recovery import repository_env

pytestmark = pytest.mark.usefixtures("prefect_harness")
PG_USER = "postgres"
KEY_ENV = "DRILL_TEST_ARCHIVE_KEY"


@pytest.fixture
def encryption_key() -> Iterator[str]:
    os.environ[KEY_ENV] = "5f" * 32
    yield KEY_ENV
    os.environ.pop(KEY_ENV, None)


def test_drill_from_encrypted_s3_replays_archived_wal(
    moto_endpoint: str, s3_bucket: str, encryption_key: str
) -> None:
    base = make_private_dir("gravl-test-drill-s3-", PG_USER)
    source = LocalCluster(base / "data", free_port(), dbname="gravl")
    config = write_config(
        base / "gravl-dr.yaml",
        {
            "cluster": "drill-s3",
            "primary": {"dsn": source.dsn()},
            "repository": {
                "url": f"s3://{s3_bucket}/gravl",
                "endpoint_url": moto_endpoint,
                "region": "eu-north-1",
                "encryption_key_env": encryption_key,
            },
        },
    )
    chown_tree(base, PG_USER)
    try:
        # GIVEN a source archiving to S3 (started with what its archive_command needs, as an
        # operator's service definition would), a backup, then writes archived after it
        backup, env = archive_backup_then_writes(source, config)
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", KEY_ENV} <= set(env)
        # WHEN the backup is drilled to the end of the archive
        report = drill_flow(config_path=str(config), backup=backup.backup_id)
        # THEN the restored server fetched and decrypted the archived WAL from S3, counts were
        # compared exactly at the LSN they were read at, and every check passed
        assert report.passed, failed_names(report)
        recovery = check(report, "recovery")
        assert "WAL from the archive" in recovery.summary and "paused" in recovery.summary
        assert "exactly" in check(report, "row-count gravl.public.workout_logs").summary
        # the key never reaches the report
        assert "5f" * 32 not in report.model_dump_json()
        assert_no_leftovers(report)
        # AND a restore with --start of the same backup replays the same archive: the rows
        # written after the backup are there
        target_dir = base / "restored"
        restored = restore_flow(
            config_path=str(config),
            backup=backup.backup_id,
            pgdata=str(target_dir),
            start=True,
            recovery_timeout=120,
        )
        copy = LocalCluster(target_dir, restored.port or 0, dbname="gravl")
        try:
            with connection(copy.dsn()) as conn, connection(source.dsn()) as src:
                query = "SELECT count(*) FROM workout_logs"
                assert conn.execute(query).fetchone() == src.execute(query).fetchone() == (250,)
            # the end-of-recovery probes (the segment after the end, the timeline history files)
            # were answered by the prefetcher's look-ups, not by starting the full command
            prefetcher_log = (target_dir / "pg_wal" / "gravl-dr" / "prefetcher.log").read_text()
            assert "asked for 00000001.history: not in the archive" in prefetcher_log, prefetcher_log
            # and the prefetcher was up before the server started (the restore starts it before
            # the settings step): PostgreSQL's first call, the probe for the next timeline's
            # history file, found it running instead of waiting for its interpreter and boto3
            assert "has its repository open before its server started" in prefetcher_log, prefetcher_log
            assert "asked for 00000002.history: not in the archive" in prefetcher_log, prefetcher_log
        finally:
            copy.destroy()
    finally:
        source.destroy()
        shutil.rmtree(base, ignore_errors=True)


def test_repository_env_passes_only_what_the_wal_commands_need(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", "/var/run/token")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    monkeypatch.setenv("UNRELATED_SECRET", "x")
    monkeypatch.setenv("ARCHIVE_KEY", "ab" * 32)
    s3 = load_config_from({"url": "s3://bucket/p", "encryption_key_env": "ARCHIVE_KEY"})
    env = repository_env(s3)
    assert (
        env["AWS_WEB_IDENTITY_TOKEN_FILE"] == "/var/run/token" and env["HTTPS_PROXY"] == "http://proxy:3128"
    )
    assert env["ARCHIVE_KEY"] == "ab" * 32 and "UNRELATED_SECRET" not in env
    # a file repository needs no AWS variables, only the key
    assert repository_env(
        load_config_from({"url": "file:///srv/repo", "encryption_key_env": "ARCHIVE_KEY"})
    ) == {"ARCHIVE_KEY": "ab" * 32}
    assert repository_env(load_config_from({"url": "file:///srv/repo"})) == {}


def load_config_from(repository: dict[str, str]) -> Config:
    return Config.model_validate(
        {"cluster": "c", "primary": {"dsn": "host=127.0.0.1 dbname=x"}, "repository": repository}
    )
