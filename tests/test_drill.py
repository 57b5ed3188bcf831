"""Restore drills end to end: real backups of a real cluster, restored into throwaway instances,
checked with pg_verifybackup, amcheck, pg_checksums and Great Expectations; reports, metrics and
teardown. One drill per test; the backups are made once per module."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import pushgateway_metrics
from drill_helpers import (
    REPO_ROOT,
    assert_no_leftovers,
    check,
    copy_backup_with_counts,
    corrupt_index,
    failed_names,
    leftovers,
)
from prometheus_client.parser import text_string_to_metric_families

from flows.backup import backup_flow
from flows.drill import drill_flow, run_drill
from gravl_testlib import GRAVL_DR, assert_one_line_error, run_cli, write_config
from tasks.drill import DIR_PREFIX, OWNER_FILE, DrillFailed, DrillReport, before_checks_hook_for_tests
from tasks.pgcluster import LocalCluster, chown_tree, free_port, make_private_dir
from tasks.postgres import connection
from tasks.sample import TABLES, create_database, load_sample

pytestmark = pytest.mark.usefixtures("prefect_harness")


@dataclass
class DrillEnv:
    source: LocalCluster
    repo_dir: Path
    config: Path
    physical: str
    logical: str


def _source(prefix: str, *, checksums: bool) -> LocalCluster:
    base = make_private_dir(prefix, "postgres")
    cluster = LocalCluster(base / "data", free_port(), dbname="gravl")
    cluster.initdb(checksums=checksums)
    cluster.start()
    create_database(cluster.dsn("postgres"), "gravl")
    load_sample(cluster.dsn(), users=100, logs=2000, custom=20)
    return cluster


def _dirs() -> tuple[Path, Path]:
    """A repository and a config directory the server user can read (restore_command runs as it)."""
    return (
        make_private_dir("gravl-test-drill-repo-", "postgres"),
        make_private_dir("gravl-test-drill-conf-", "postgres"),
    )


def _config(
    path: Path, cluster: LocalCluster, repo_dir: Path, gateway: str | None = None, **drill: object
) -> Path:
    data: dict[str, object] = {
        "cluster": "drill-test",
        "primary": {"dsn": cluster.dsn()},
        "repository": {"url": f"file://{repo_dir}"},
        "drill": {"suites_dir": str(REPO_ROOT / "expectations"), **drill},
    }
    if gateway:
        data["metrics"] = {"pushgateway": gateway}
    written = write_config(path, data)
    chown_tree(written, "postgres")
    return written


@pytest.fixture(scope="module")
def env(prefect_harness: None, pushgateway: str) -> Iterator[DrillEnv]:
    """A checksummed source with the Gravl sample, one physical and one logical backup of it."""
    source = _source("gravl-test-drill-src-", checksums=True)
    repo_dir, conf_dir = _dirs()
    try:
        config = _config(conf_dir / "gravl-dr.yaml", source, repo_dir, pushgateway)
        physical = backup_flow(config_path=str(config), kind="physical").backup_id
        logical = backup_flow(config_path=str(config), kind="logical").backup_id
        yield DrillEnv(source, repo_dir, config, physical, logical)
    finally:
        source.destroy()
        shutil.rmtree(source.pgdata.parent, ignore_errors=True)
        shutil.rmtree(repo_dir, ignore_errors=True)
        shutil.rmtree(conf_dir, ignore_errors=True)


def _stored_report(repo_dir: Path, report: DrillReport) -> dict[str, object]:
    data = json.loads((repo_dir / "drills" / report.drill_id / "report.json").read_text())
    assert isinstance(data, dict)
    return data


def _drill_metrics(gateway: str, cluster: str) -> dict[str, float]:
    found = {}
    for family in text_string_to_metric_families(pushgateway_metrics(gateway)):
        for sample in family.samples:
            if sample.labels.get("job") == "drill" and sample.labels.get("cluster") == cluster:
                found[sample.name] = sample.value
    return found


def test_drill_of_a_good_physical_backup_passes_and_reports_every_check(
    env: DrillEnv, pushgateway: str
) -> None:
    # WHEN the physical backup of a checksummed cluster is drilled
    report = drill_flow(config_path=str(env.config), backup=env.physical)
    # THEN every check ran and passed, each one named in the report
    assert report.passed, failed_names(report)
    names = {c.name for c in report.checks}
    for expected in [
        "restore",
        "pg_verifybackup",
        "recovery",
        "amcheck gravl",
        "amcheck postgres",
        "freshness gravl.public.workout_logs",
        "usability gravl",
        "pg_checksums",
        "primary-key gravl.public.users(id)",
        "primary-key gravl.public.muscle_group_recovery(user_id,muscle_group)",
        "fk-orphans gravl.public.workout_swaps(workout_log_id)->public.workout_logs",
        "suite gravl: gravl.public.muscle_group_recovery recovery_score within 0..100",
        "suite gravl: gravl.public.workout_logs completed_at never in the future",
        "suite gravl: gravl.public.workout_swaps swaps reference existing logs",
    ]:
        assert expected in names, expected
    for table in TABLES:
        assert check(report, f"row-count gravl.public.{table}").status == "passed"
    assert all(c.status == "passed" for c in report.checks), [
        c for c in report.checks if c.status != "passed"
    ]
    assert "files and WAL match backup_manifest" in check(report, "pg_verifybackup").summary
    # no WAL past the backup is archived here: no pause, the counts are compared on the promoted
    # instance, where recovery ended at the backup's end
    assert "paused" not in check(report, "recovery").summary
    assert "consistent point" not in check(report, "row-count gravl.public.users").summary
    # ... with a measured RTO and RPO, the report stored in the repository as JSON and markdown
    assert report.rto_seconds is not None and 0 < report.rto_seconds == pytest.approx(
        report.restore_seconds + report.recovery_seconds
    )
    assert report.rpo_seconds is not None and report.rpo_seconds >= 0
    stored = _stored_report(env.repo_dir, report)
    assert stored["passed"] is True and stored["backup_id"] == env.physical
    assert [c["name"] for c in stored["checks"]] == [c.name for c in report.checks]  # type: ignore[attr-defined]
    markdown = (env.repo_dir / "drills" / report.drill_id / "report.md").read_text()
    assert "PASSED" in markdown and "| amcheck gravl | passed |" in markdown and "RTO" in markdown
    # ... the metrics pushed, and nothing of the instance left
    metrics = _drill_metrics(pushgateway, "drill-test")
    assert metrics["gravl_drill_success"] == 1.0
    assert metrics["gravl_drill_rto_seconds"] == pytest.approx(report.rto_seconds)
    assert "gravl_drill_last_success_timestamp_seconds" in metrics
    assert_no_leftovers(report)


def test_drill_of_a_good_logical_backup_passes_with_exact_row_counts(env: DrillEnv) -> None:
    report = drill_flow(config_path=str(env.config), backup=env.logical)
    assert report.passed, failed_names(report)
    counts = check(report, "row-count gravl.public.workout_logs")
    assert counts.status == "passed" and "exactly 2000" in counts.summary
    assert check(report, "pg_verifybackup" if False else "amcheck gravl").status == "passed"
    assert check(report, "usability gravl").status == "passed"
    assert check(report, "recovery").status == "skipped"  # a dump has no WAL to replay
    assert_no_leftovers(report)


def test_drill_fails_naming_the_row_count_check_when_the_manifest_disagrees(env: DrillEnv) -> None:
    # GIVEN a copy of the physical backup whose manifest records 10 % more workout logs
    with connection(env.source.dsn()) as conn:
        counts = {
            "gravl": {
                f"public.{t}": int(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0])  # type: ignore[index]
                for t in TABLES
            }
        }
    counts["gravl"]["public.workout_logs"] = 2200
    copy_backup_with_counts(env.repo_dir, env.physical, "20000101T000000Z-physical", counts)
    # WHEN it is drilled through the CLI
    proc = run_cli("drill", "20000101T000000Z-physical", config=env.config, timeout=240)
    # THEN the command fails with one line naming the check; the other tables still pass
    assert_one_line_error(proc, "FAILED", "row-count gravl.public.workout_logs")
    reports = sorted((env.repo_dir / "drills").glob("*/report.json"))
    stored = [json.loads(p.read_text()) for p in reports]
    latest = next(r for r in stored if r["backup_id"] == "20000101T000000Z-physical")
    failed = [c["name"] for c in latest["checks"] if c["status"] == "failed"]
    assert failed == ["row-count gravl.public.workout_logs"]
    assert DrillReport.model_validate(latest).drill_id == latest["drill_id"]
    assert_no_leftovers(DrillReport.model_validate(latest))


def test_drill_fails_naming_the_index_amcheck_found_corrupt(env: DrillEnv) -> None:
    # GIVEN a test hook that corrupts an index of the restored instance before its checks
    def corrupt(cluster: LocalCluster) -> None:
        corrupt_index(cluster, "gravl", "workout_logs_user_completed")

    # WHEN the good physical backup is drilled
    with before_checks_hook_for_tests(corrupt), pytest.raises(DrillFailed) as failure:
        drill_flow(config_path=str(env.config), backup=env.physical)
    # THEN the flow fails naming amcheck, and the sample names the index
    report = failure.value.report
    assert "amcheck gravl" in str(failure.value)
    amcheck = check(report, "amcheck gravl")
    assert amcheck.status == "failed"
    assert amcheck.samples and amcheck.samples[0]["index"] == "public.workout_logs_user_completed"
    assert check(report, "amcheck postgres").status == "passed"
    assert_no_leftovers(report)


def test_drill_fails_naming_the_foreign_key_with_orphans(prefect_harness: None) -> None:
    # GIVEN a source where a workout log was deleted with FK triggers off: its swap is an orphan
    source = _source("gravl-test-drill-fk-", checksums=False)
    repo_dir, conf_dir = _dirs()
    try:
        with connection(source.dsn(), autocommit=False) as conn:
            conn.execute("SET session_replication_role = replica")
            conn.execute("DELETE FROM workout_logs WHERE id = 13")
            conn.commit()
        config = _config(conf_dir / "gravl-dr.yaml", source, repo_dir)
        backup_flow(config_path=str(config), kind="physical")
        # WHEN it is drilled
        report = run_drill(str(config))
        # THEN the drill failed, naming the default FK check and the gravl suite's, with the orphan
        assert not report.passed
        assert set(failed_names(report)) == {
            "fk-orphans gravl.public.workout_swaps(workout_log_id)->public.workout_logs",
            "suite gravl: gravl.public.workout_swaps swaps reference existing logs",
        }
        orphans = check(report, "fk-orphans gravl.public.workout_swaps(workout_log_id)->public.workout_logs")
        assert orphans.samples == [{"workout_log_id": 13}] and orphans.summary.startswith("1 orphan")
        assert check(report, "pg_checksums").status == "skipped"  # source has no checksums
        assert_no_leftovers(report)
    finally:
        source.destroy()
        shutil.rmtree(source.pgdata.parent, ignore_errors=True)
        shutil.rmtree(repo_dir, ignore_errors=True)
        shutil.rmtree(conf_dir, ignore_errors=True)


def test_a_drill_terminated_mid_run_tears_down_its_instance(env: DrillEnv) -> None:
    # GIVEN a drill started from the command line, its throwaway server running
    proc = subprocess.Popen(
        [GRAVL_DR, "--config", str(env.config), "drill", env.physical],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(REPO_ROOT),
    )
    try:
        drill_dir = _wait_for_running_instance(proc, timeout=180)
        # WHEN it is terminated (as a worker cancelling the run, or Kubernetes stopping the pod, does)
        proc.send_signal(signal.SIGTERM)
        # (its pipes reach end-of-file only once every process holding them has exited, Prefect's
        # ephemeral API server included: an orphaned one would keep them open)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    # THEN it exits 143 saying so, its server stopped and its directory removed
    assert proc.returncode == 143 and "gravl-dr: terminated (SIGTERM)" in err
    drill_id = drill_dir.name.removeprefix(DIR_PREFIX).rsplit("-", 1)[0]
    assert leftovers(drill_id) == {"dirs": [], "processes": []}


def _wait_for_running_instance(proc: subprocess.Popen[str], timeout: float) -> Path:
    """The work directory of the drill run by ``proc`` once its server has started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        for workdir in Path(tempfile.gettempdir()).glob(f"{DIR_PREFIX}*"):
            with contextlib.suppress(OSError, ValueError):
                owner = json.loads((workdir / OWNER_FILE).read_text())
                if owner.get("pid") == proc.pid and (workdir / "data" / "postmaster.pid").exists():
                    return workdir
        time.sleep(0.2)
    raise AssertionError(f"no running drill instance of pid {proc.pid} after {timeout:.0f}s")
