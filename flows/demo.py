"""Orchestration: `gravl-dr demo` — the whole procedure on embedded defaults, then clean up.

A throwaway PostgreSQL cluster with the Gravl sample schema, archiving its WAL through
`gravl-dr wal-push` into a local repository; a physical and a logical backup (the backup flow);
more writes after the physical backup; a restore of each into fresh clusters (the restore flow,
replaying archived WAL to the end of the archive) compared table by table with the source; and
a restore drill of the physical backup (integrity checks and Great Expectations suites).
Nothing outside one temporary directory is touched.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Annotated

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from flows.backup import backup_flow
from flows.common import human_bytes, logger, publish_report
from flows.drill import run_drill
from flows.heartbeat import send_heartbeat
from flows.restore import restore_flow
from tasks.errors import PermanentError
from tasks.pgcluster import LocalCluster, free_port, make_private_dir
from tasks.postgres import database_digest
from tasks.reporting import bullets, document, report_key
from tasks.sample import create_database, demo_config, load_sample, write_and_archive


class DemoReport(BaseModel):
    ok: bool
    tables: int
    rows: int
    physical_backup: str
    logical_backup: str
    physical_restore_seconds: float
    logical_restore_seconds: float
    lines: list[str]


def _gravl_dr() -> str:
    return str(Path(sys.executable).parent / "gravl-dr")


@task(name="start-demo-cluster", cache_policy=NO_CACHE)
def start_demo_cluster(base: str, config: str, port: int, users: int, logs: int) -> LocalCluster:
    cluster = LocalCluster(Path(base) / "primary", port, dbname="gravl")
    cluster.initdb(
        checksums=True,
        extra_conf={
            "archive_mode": "on",
            "archive_command": f"'{_gravl_dr()} --config {config} wal-push %p'",
            "archive_timeout": "'60s'",
        },
    )
    cluster.start()
    create_database(cluster.dsn("postgres"), "gravl")
    load_sample(cluster.dsn(), users=users, logs=logs, custom=max(10, users // 4))
    logger().info("throwaway PostgreSQL on 127.0.0.1:%d with the Gravl sample database", cluster.port)
    return cluster


@task(name="write-demo-config", cache_policy=NO_CACHE)
def write_demo_config(base: str, port: int) -> str:
    return str(demo_config(Path(base), port, SUITES_DIR))


@task(name="write-after-backup", cache_policy=NO_CACHE)
def write_after_backup(dsn: str, rows: int) -> str:
    """New workouts logged after the base backup: only WAL replay can bring them back."""
    name = write_and_archive(dsn, rows)
    logger().info("%d rows written after the backup; WAL up to %s archived", rows, name)
    return name


@task(name="start-restore-target", cache_policy=NO_CACHE)
def start_restore_target(base: str) -> LocalCluster:
    cluster = LocalCluster(Path(base) / "logical-target", free_port(), dbname="gravl")
    cluster.initdb()
    cluster.start()
    create_database(cluster.dsn("postgres"), "gravl")
    return cluster


@task(name="compare-tables", cache_policy=NO_CACHE)
def compare_tables(source_dsn: str, restored_dsn: str, label: str) -> tuple[int, int]:
    source, restored = database_digest(source_dsn), database_digest(restored_dsn)
    if source != restored:
        differ = sorted(t for t in set(source) | set(restored) if source.get(t) != restored.get(t))
        raise PermanentError(f"{label} restore differs from the source in: {', '.join(differ)}")
    rows = sum(n for n, _ in source.values())
    logger().info("%s restore: %d tables, %d rows, identical content", label, len(source), rows)
    return len(source), rows


SUITES_DIR = Path(__file__).resolve().parent.parent / "expectations"


@flow(name="demo", on_running=[send_heartbeat])
def demo_flow(
    users: Annotated[int, Field(ge=1, le=1_000_000)] = 500,
    logs: Annotated[int, Field(ge=0, le=100_000_000)] = 20000,
    keep: bool = False,
) -> DemoReport:
    """Back up a throwaway Gravl database, restore it twice, prove the copies are identical.

    Args:
        users: Users in the generated sample database.
        logs: Workout logs in the generated sample database (its size).
        keep: Keep the throwaway clusters and repository afterwards (their directory is logged).
    """
    base = make_private_dir("gravl-dr-demo-", "postgres")
    clusters: list[LocalCluster] = []
    try:
        port0 = free_port()
        config = write_demo_config(str(base), port0)
        primary = start_demo_cluster(str(base), config, port0, users, logs)
        clusters.append(primary)
        phys = backup_flow(config_path=config, kind="physical")
        late_rows = 250
        write_after_backup(primary.dsn(), late_rows)
        logi = backup_flow(config_path=config, kind="logical")
        port = free_port()
        restored = restore_flow(
            config_path=config, backup=phys.backup_id, pgdata=str(base / "restored"), start=True, port=port
        )
        clusters.append(LocalCluster(base / "restored", port, dbname="gravl"))
        tables, rows = compare_tables(primary.dsn(), clusters[-1].dsn(), "physical")
        target = start_restore_target(str(base))
        clusters.append(target)
        restored_l = restore_flow(
            config_path=config, backup=logi.backup_id, dsn=target.dsn(), database="gravl"
        )
        compare_tables(primary.dsn(), target.dsn(), "logical")
        lines = [
            f"source: Gravl sample database, {tables} tables, {rows} rows",
            f"physical backup {phys.backup_id}: {human_bytes(phys.raw_bytes)} -> "
            f"{human_bytes(phys.stored_bytes)} in {phys.total_seconds:.1f}s",
            f"logical backup {logi.backup_id}: {human_bytes(logi.raw_bytes)} -> "
            f"{human_bytes(logi.stored_bytes)} in {logi.total_seconds:.1f}s",
            f"physical restore + WAL replay to the end of the archive: {restored.seconds:.1f}s, "
            f"every table identical (incl. {late_rows} rows written after the backup)",
            f"logical restore (pg_restore -j2): {restored_l.seconds:.1f}s, every table identical",
        ]
        drill = run_drill(config, backup=phys.backup_id)
        skipped = sum(1 for c in drill.checks if c.status == "skipped")
        lines.append(
            f"restore drill: {drill.verdict()}, {skipped} skipped (RTO {drill.rto_seconds or 0:.1f}s)"
        )
        for check in drill.failed_checks:
            lines.append(f"  failed check {check.name}: {check.summary}")
        report = DemoReport(
            ok=drill.passed,
            tables=tables,
            rows=rows,
            physical_backup=phys.backup_id,
            logical_backup=logi.backup_id,
            physical_restore_seconds=restored.seconds,
            logical_restore_seconds=restored_l.seconds,
            lines=lines,
        )
        publish_report(
            report_key("demo", "gravl-demo"),
            document([f"# gravl-dr demo: {'OK' if report.ok else 'FAILED'}", "", *bullets(lines)]),
        )
        return report
    finally:
        if keep:
            logger().info("kept everything under %s", base)
        else:
            for cluster in clusters:
                cluster.destroy()
            shutil.rmtree(base, ignore_errors=True)


def summary(report: DemoReport, seconds: float) -> str:
    head = "gravl-dr demo: OK" if report.ok else "gravl-dr demo: FAILED"
    return "\n".join([head, *[f"  - {ln}" for ln in report.lines], f"  ({seconds:.0f}s in all)"])
