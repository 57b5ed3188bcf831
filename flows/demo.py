"""Orchestration: `gravl-dr demo` — the whole procedure on embedded defaults, then clean up.

A throwaway PostgreSQL cluster with the Gravl sample schema, a local repository, a physical and
a logical backup (the backup flow), a restore of each into fresh clusters (the restore flow),
and a table-by-table comparison of contents. Nothing outside one temporary directory is touched.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from flows.backup import backup_flow
from flows.common import human_bytes, logger
from flows.restore import restore_flow
from tasks.errors import PermanentError
from tasks.pgcluster import LocalCluster, free_port, make_private_dir
from tasks.postgres import database_digest
from tasks.sample import create_database, load_sample


class DemoReport(BaseModel):
    ok: bool
    tables: int
    rows: int
    physical_backup: str
    logical_backup: str
    physical_restore_seconds: float
    logical_restore_seconds: float
    lines: list[str]


@task(name="start-demo-cluster", cache_policy=NO_CACHE)
def start_demo_cluster(base: str, users: int, logs: int) -> LocalCluster:
    cluster = LocalCluster(Path(base) / "primary", free_port(), dbname="gravl")
    cluster.initdb(checksums=True)
    cluster.start()
    create_database(cluster.dsn("postgres"), "gravl")
    load_sample(cluster.dsn(), users=users, logs=logs, custom=max(10, users // 4))
    logger().info("throwaway PostgreSQL on 127.0.0.1:%d with the Gravl sample database", cluster.port)
    return cluster


@task(name="write-demo-config", cache_policy=NO_CACHE)
def write_demo_config(base: str, cluster: LocalCluster) -> str:
    import yaml

    path = Path(base) / "gravl-dr.yaml"
    path.write_text(yaml.safe_dump({
        "cluster": "gravl-demo",
        "primary": {"dsn": cluster.dsn()},
        "repository": {"url": f"file://{Path(base) / 'repository'}", "compression": "zstd"},
    }, sort_keys=False))
    return str(path)


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


@flow(name="demo")
def demo_flow(users: int = 500, logs: int = 20000, keep: bool = False) -> DemoReport:
    """Back up a throwaway Gravl database, restore it twice, prove the copies are identical."""
    base = make_private_dir("gravl-dr-demo-", "postgres")
    clusters: list[LocalCluster] = []
    try:
        primary = start_demo_cluster(str(base), users, logs)
        clusters.append(primary)
        config = write_demo_config(str(base), primary)
        phys = backup_flow(config_path=config, kind="physical")
        logi = backup_flow(config_path=config, kind="logical")
        port = free_port()
        restored = restore_flow(config_path=config, backup=phys.backup_id,
                                pgdata=str(base / "restored"), start=True, port=port)
        clusters.append(LocalCluster(base / "restored", port, dbname="gravl"))
        tables, rows = compare_tables(primary.dsn(), clusters[-1].dsn(), "physical")
        target = start_restore_target(str(base))
        clusters.append(target)
        restored_l = restore_flow(config_path=config, backup=logi.backup_id, dsn=target.dsn())
        compare_tables(primary.dsn(), target.dsn(), "logical")
        lines = [
            f"source: Gravl sample database, {tables} tables, {rows} rows",
            f"physical backup {phys.backup_id}: {human_bytes(phys.raw_bytes)} -> "
            f"{human_bytes(phys.stored_bytes)} in {phys.total_seconds:.1f}s",
            f"logical backup {logi.backup_id}: {human_bytes(logi.raw_bytes)} -> "
            f"{human_bytes(logi.stored_bytes)} in {logi.total_seconds:.1f}s",
            f"physical restore + start: {restored.seconds:.1f}s, every table identical",
            f"logical restore (pg_restore -j2): {restored_l.seconds:.1f}s, every table identical",
        ]
        report = DemoReport(ok=True, tables=tables, rows=rows, physical_backup=phys.backup_id,
                            logical_backup=logi.backup_id,
                            physical_restore_seconds=restored.seconds,
                            logical_restore_seconds=restored_l.seconds, lines=lines)
        create_markdown_artifact(key="demo-report", markdown="# gravl-dr demo: OK\n\n" +
                                 "\n".join(f"- {ln}" for ln in lines) + "\n")
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


_ = (time, Any)
