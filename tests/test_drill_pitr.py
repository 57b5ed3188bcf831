"""Point-in-time drills: a source archiving through `gravl-dr wal-push`, a backup, then history in
archived WAL; drills replay it to a target time — and fail, naming recovery, when a segment the
target needs is missing from the archive."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from drill_helpers import (
    REPO_ROOT,
    assert_no_leftovers,
    check,
    copy_backup_with_counts,
    failed_names,
    switch_and_wait,
)

from flows.backup import backup_flow
from flows.drill import drill_flow
from gravl_testlib import write_config
from tasks.drill import DrillFailed
from tasks.models import wal_name_from_segno, wal_segno
from tasks.pgcluster import LocalCluster, chown_tree, free_port, make_private_dir
from tasks.postgres import connection
from tasks.recovery import gravl_dr_executable
from tasks.sample import create_database, load_sample

pytestmark = pytest.mark.usefixtures("prefect_harness")
PG_USER = "postgres"


@dataclass
class History:
    base: Path
    source: LocalCluster
    repo_dir: Path
    config: Path
    backup_id: str
    stop_wal: str
    target: datetime  # after batch "a" committed, before batch "b"


def _insert_logs(cluster: LocalCluster, n: int) -> None:
    with connection(cluster.dsn()) as conn:
        conn.execute(
            "INSERT INTO workout_logs (user_id, workout_id, completed_at, sets, reps) "
            "SELECT 1 + g %% 50, 1 + g %% 60, now(), 3, 10 FROM generate_series(1, %s) g",
            (n,),
        )


@pytest.fixture(scope="module")
def history(prefect_harness: None) -> Iterator[History]:
    base = make_private_dir("gravl-test-drill-pitr-", PG_USER)
    repo_dir = base / "repo"
    repo_dir.mkdir()
    source = LocalCluster(base / "data", free_port(), dbname="gravl")
    config = write_config(
        base / "gravl-dr.yaml",
        {
            "cluster": "drill-pitr",
            "primary": {"dsn": source.dsn()},
            "repository": {"url": f"file://{repo_dir}"},
            "drill": {"suites_dir": str(REPO_ROOT / "expectations")},
        },
    )
    chown_tree(base, PG_USER)
    try:
        source.initdb(
            extra_conf={
                "archive_mode": "on",
                "archive_command": f"'{gravl_dr_executable()} --config {config} wal-push %p'",
                "wal_keep_size": "'0'",
            }
        )
        source.start()
        create_database(source.dsn("postgres"), "gravl")
        load_sample(source.dsn(), users=50, logs=500, custom=10)
        report = backup_flow(config_path=str(config), kind="physical")
        chown_tree(repo_dir, PG_USER)
        stop_wal = _stop_wal(repo_dir, report.backup_id)
        _insert_logs(source, 100)  # batch a, in the segment after the backup's
        time.sleep(0.5)
        target = datetime.now(UTC)
        time.sleep(0.5)
        switch_and_wait(source)
        _insert_logs(source, 100)  # batch b, after the target
        switch_and_wait(source)
        yield History(base, source, repo_dir, config, report.backup_id, stop_wal, target)
    finally:
        source.destroy()
        shutil.rmtree(base, ignore_errors=True)


def _stop_wal(repo_dir: Path, backup_id: str) -> str:
    import json

    return str(json.loads((repo_dir / "backups" / backup_id / "manifest.json").read_text())["stop_wal"])


def test_drill_to_a_target_time_replays_archived_wal_and_passes(history: History) -> None:
    # WHEN the backup is drilled to a time between two batches of archived writes
    report = drill_flow(config_path=str(history.config), backup=history.backup_id, target_time=history.target)
    # THEN recovery stopped at the target (WAL from the archive), every check passed
    assert report.passed, failed_names(report)
    recovery = check(report, "recovery")
    assert "recovery stopping before" in recovery.summary and "WAL from the archive" in recovery.summary
    assert report.recovered_to == history.target
    assert report.rpo_seconds is not None and report.rpo_seconds > 0
    # counts recorded at backup time (500 logs) were compared where they apply: recovery paused
    # at the backup's consistent point; at the target there are 600, outside the 1 % tolerance
    logs = check(report, "row-count gravl.public.workout_logs")
    assert logs.status == "passed" and "at the backup's consistent point" in logs.summary
    assert "500" in logs.summary
    assert "paused at the backup's consistent point" in recovery.summary
    # the newest timestamp of each table, against what the source had at backup time
    assert check(report, "freshness gravl.public.workout_logs").status == "passed"
    assert_no_leftovers(report)


def test_drill_to_the_end_of_the_archive_compares_row_counts_at_the_counts_lsn(history: History) -> None:
    # GIVEN a copy of the backup whose manifest records 450 workout logs (the backup holds 500;
    # the archive adds 200 more after it)
    manifest = json.loads((history.repo_dir / "backups" / history.backup_id / "manifest.json").read_text())
    counts = {db: dict(tables) for db, tables in manifest["row_counts"].items()}
    assert counts["gravl"]["public.workout_logs"] == 500
    good = dict(counts["gravl"])
    counts["gravl"]["public.workout_logs"] = 450
    copy_id = "20000101T000000Z-counts"
    copy_backup_with_counts(history.repo_dir, history.backup_id, copy_id, counts)
    chown_tree(history.repo_dir, PG_USER)
    try:
        # WHEN it is drilled to the end of the archive
        with pytest.raises(DrillFailed) as failure:
            drill_flow(config_path=str(history.config), backup=copy_id)
        # THEN recovery replayed the archive, and only the disagreeing count failed, naming
        # where it was compared and what the manifest says
        report = failure.value.report
        assert "WAL from the archive" in check(report, "recovery").summary
        assert failed_names(report) == ["row-count gravl.public.workout_logs"]
        logs = check(report, "row-count gravl.public.workout_logs")
        assert "observed 500" in logs.summary and "manifest: exactly 450" in logs.summary
        # exactly, with recovery paused at the LSN the backup read its counts at
        assert (
            "exactly 450 at " in logs.summary
            and "paused just before LSN" in check(report, "recovery").summary
        )
        others = [c for c in report.checks if c.kind == "row-count" and c.status == "passed"]
        assert {c.name.removeprefix("row-count gravl.") for c in others} == set(good) - {
            "public.workout_logs"
        }
        assert_no_leftovers(report)
    finally:
        shutil.rmtree(history.repo_dir / "backups" / copy_id, ignore_errors=True)


def test_drill_fails_naming_recovery_when_a_wal_segment_the_target_needs_is_missing(history: History) -> None:
    # GIVEN a copy of the repository without the first archived segment after the backup's end
    copy = make_private_dir("gravl-test-drill-pitr-copy-", PG_USER)
    try:
        shutil.copytree(history.repo_dir, copy / "repo")
        tli, stop_segno = wal_segno(history.stop_wal)
        wanted = wal_name_from_segno(tli, stop_segno + 1)
        removed = [p for p in (copy / "repo" / "wal").rglob(f"{wanted}*")]
        assert removed, sorted(p.name for p in (copy / "repo" / "wal").rglob("*"))
        for path in removed:
            path.unlink()
        config = write_config(
            copy / "gravl-dr.yaml",
            {
                "cluster": "drill-pitr",
                "primary": {"dsn": history.source.dsn()},
                "repository": {"url": f"file://{copy / 'repo'}"},
            },
        )
        chown_tree(copy, PG_USER)
        # WHEN the backup is drilled to the target time
        with pytest.raises(DrillFailed) as failure:
            drill_flow(config_path=str(config), backup=history.backup_id, target_time=history.target)
        # THEN the drill fails naming the recovery step, with the server's reason
        report = failure.value.report
        assert failed_names(report) == ["recovery"]
        assert "recovery" in str(failure.value)
        assert "before configured recovery target was reached" in check(report, "recovery").summary
        assert_no_leftovers(report)
    finally:
        shutil.rmtree(copy, ignore_errors=True)
