"""Timelines, RPO and the WAL flow, against real servers archiving through `gravl-dr wal-push`."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import pushgateway_metrics
from test_pitr import (
    Archiving,
    phases,
    private_restore_dir,
    restored_dsn,
    run_restore,
    start_archiving_primary,
    stop_archiving,
    switch_and_wait,
    take_backup,
)

from gravl_testlib import run_cli
from tasks.pgcluster import LocalCluster, free_port
from tasks.polling import poll_until
from tasks.postgres import connection
from tasks.proc import pg_bin, run

PG_USER = "postgres"


def insert(dsn: str, phase: str, n: int = 3) -> None:
    with connection(dsn) as conn:
        conn.execute("INSERT INTO events(phase, n) SELECT %s, g FROM generate_series(1, %s) g", (phase, n))


def text_value(dsn: str, query: str) -> str | None:
    """The one value a query returns, as text (None for SQL NULL)."""
    with connection(dsn) as conn:
        row = conn.execute(query).fetchone()
    assert row is not None, query
    return None if row[0] is None else str(row[0])


@pytest.fixture
def restore_dir() -> Iterator[Path]:
    yield from private_restore_dir("gravl-test-tli-restore-")


def test_after_a_promotion_the_archive_holds_the_history_and_restore_follows_the_new_timeline(
    prefect_harness: None, restore_dir: Path
) -> None:
    # GIVEN a primary archiving through wal-push, a backup, and a streaming standby
    arch = start_archiving_primary("gravl-test-tli-")
    standby = LocalCluster(arch.base / "standby", free_port())
    try:
        arch.sql("CREATE TABLE events(id serial PRIMARY KEY, phase text, n int)")
        insert(arch.cluster.dsn("postgres"), "a")
        take_backup(arch)
        run(
            [
                pg_bin("pg_basebackup"),
                "-h",
                "127.0.0.1",
                "-p",
                str(arch.cluster.port),
                "-U",
                "postgres",
                "-D",
                str(standby.pgdata),
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
            ],
            timeout=120,
            os_user=PG_USER,
        )
        standby.append_conf({"port": str(standby.port)}, file="postgresql.auto.conf")
        standby.start()
        insert(arch.cluster.dsn("postgres"), "b")
        switch_and_wait(arch)
        lsn = arch.sql("SELECT pg_current_wal_lsn()::text")[0][0]
        sdsn = standby.dsn("postgres")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with connection(sdsn) as conn:
                row = conn.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)).fetchone()
            if row and row[0]:
                break
            time.sleep(0.1)
        # WHEN the primary is lost and the standby is promoted, then writes on timeline 2
        arch.cluster.stop()
        with connection(sdsn) as conn:
            conn.execute("SELECT pg_promote(wait => true, wait_seconds => 30)")
        insert(sdsn, "c")
        name = text_value(sdsn, "SELECT pg_walfile_name(pg_switch_wal())")
        assert name is not None

        def archived_on_timeline_2() -> bool:
            last = text_value(sdsn, "SELECT last_archived_wal FROM pg_stat_archiver")
            return last is not None and last.startswith("00000002") and last[:24] >= name

        poll_until(archived_on_timeline_2, timeout=30, interval=0.1)
        # THEN the archive holds timeline 2's history file, and the whole archive is continuous
        assert (arch.repo_dir / "wal" / "00000002" / "00000002.history.zst").is_file()
        proc = run_cli("wal-check", "--no-server", "--json", config=arch.config)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert {t["timeline"] for t in json.loads(proc.stdout)["timelines"]} == {1, 2}
        # AND a restore to the end of the archive follows the latest timeline
        report = run_restore(arch, restore_dir)
        assert phases(restored_dsn(report)) == {"a": 3, "b": 3, "c": 3}
        assert report.timeline == 3
    finally:
        standby.destroy()
        stop_archiving(arch)


# ---------------------------------------------------------------- RPO and the flow


@pytest.fixture(scope="module")
def busy() -> Iterator[Archiving]:
    """A primary with archive_timeout = 2s (a test-sized stand-in for the recommended 60s)."""
    arch = start_archiving_primary("gravl-test-rpo-", archive_timeout="2s")
    try:
        arch.sql(
            "CREATE TABLE events(id serial PRIMARY KEY, phase text, n int,"
            " at timestamptz DEFAULT clock_timestamp())"
        )
        take_backup(arch)
        yield arch
    finally:
        stop_archiving(arch)


def test_rpo_after_a_burst_and_idle_is_within_archive_timeout(busy: Archiving) -> None:
    # GIVEN a burst of writes, then no activity at all
    dsn = busy.cluster.dsn("postgres")
    for i in range(20):
        insert(dsn, f"burst-{i}", 50)
    committed_at = time.monotonic()
    lsn = busy.sql("SELECT pg_current_wal_insert_lsn()::text")[0][0]
    # WHEN nobody calls pg_switch_wal(): only archive_timeout pushes the segment out
    from tasks.models import parse_lsn, wal_file_name

    needed = wal_file_name(1, parse_lsn(lsn) - 1)
    archived_after = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if list(busy.repo_dir.glob(f"wal/00000001/{needed}*")):
            archived_after = time.monotonic() - committed_at
            break
        time.sleep(0.1)
    # THEN the last write is in the repository within archive_timeout + a few seconds
    assert archived_after is not None, "last write never archived"
    assert archived_after <= 2 + 3, archived_after
    # AND wal-check sees no lag once it is archived
    proc = run_cli("wal-check", "--json", config=busy.config)
    doc = json.loads(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert doc["archiver"]["archive_timeout_s"] == 2
    assert doc["lag_bytes"] is not None and doc["lag_bytes"] < 16 * 1024 * 1024


def test_wal_flow_reports_health_and_pushes_metrics(
    prefect_harness: None, busy: Archiving, pushgateway: str, tmp_path: Path
) -> None:
    from flows.wal import wal_check_flow
    from gravl_testlib import write_config
    from tasks.config import load_config

    cfg = load_config(str(busy.config)).model_dump(exclude_none=True)
    cfg["metrics"] = {"pushgateway": pushgateway}
    config = write_config(tmp_path / "wal.yaml", cfg)
    insert(busy.cluster.dsn("postgres"), "flow")
    switch_and_wait(busy)
    report = wal_check_flow(config_path=str(config))
    assert report.ok and report.archiver is not None and report.archiver.reachable
    assert report.last_archived_verified is True
    metrics = pushgateway_metrics(pushgateway)
    for name in (
        "gravl_wal_archive_lag_bytes",
        "gravl_wal_archive_gaps",
        "gravl_wal_check_last_success_timestamp_seconds",
        "gravl_wal_archiver_failed_count",
    ):
        assert f'{name}{{cluster="gravl",' in metrics and 'job="wal-check"' in metrics, name
    assert 'gravl_primary_up{cluster="gravl",instance="",job="wal-check"} 1' in metrics
    from prefect.client.orchestration import get_client

    async def artifact() -> str:
        async with get_client() as client:
            found = await client.read_latest_artifacts()
            data = next(a.data for a in found if a.key == "wal-check-report-gravl")
            assert isinstance(data, str), data
            return data

    import asyncio

    text = asyncio.run(artifact())
    assert "# WAL archive of gravl: OK" in text and "## Timelines" in text


def test_wal_check_reports_a_failing_archiver(busy: Archiving, tmp_path: Path) -> None:
    # GIVEN archive_command starts failing (the repository became read-only for the server)
    original = busy.sql("SHOW archive_command")[0][0]
    busy.sql("ALTER SYSTEM SET archive_command = 'false'")
    busy.sql("SELECT pg_reload_conf()")
    try:
        insert(busy.cluster.dsn("postgres"), "failing")
        busy.sql("SELECT pg_switch_wal()")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if busy.sql("SELECT failed_count FROM pg_stat_archiver")[0][0] > 0:
                break
            time.sleep(0.2)
        # WHEN checking
        proc = run_cli("wal-check", config=busy.config)
        # THEN the failure is named and the command fails
        assert proc.returncode != 0
        assert "archiving is failing" in proc.stderr
    finally:
        busy.sql("ALTER SYSTEM RESET archive_command")
        busy.sql("SELECT pg_reload_conf()")
        assert original
