"""Orchestration: the restore flow — choose a backup, verify it, restore, optionally start."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from flows.common import NETWORK_RETRIES, human_bytes, load, logger
from tasks import backup as bsteps
from tasks import restore as rsteps
from tasks.config import Config
from tasks.errors import PreconditionFailed, one_line
from tasks.models import Manifest
from tasks.pgcluster import LocalCluster, free_port
from tasks.postgres import safe_dsn
from tasks.repository import Repository


class RestoreReport(BaseModel):
    backup_id: str
    kind: str
    target: str
    raw_bytes: int
    seconds: float
    verify_seconds: float
    started: bool = False
    port: int | None = None


@task(name="select-backup", cache_policy=NO_CACHE, **NETWORK_RETRIES)
def select_backup(repo: Repository, ref: str, kind: str | None, cluster: str) -> Manifest:
    manifest = bsteps.resolve_backup(repo, ref, kind=kind, cluster=cluster)
    logger().info("restoring backup %s (%s, %s, ended %s)", manifest.id, manifest.kind,
                  human_bytes(manifest.raw_bytes), manifest.stop_time.isoformat())
    return manifest


@task(name="restore-physical", cache_policy=NO_CACHE)
def restore_physical(cfg: Config, repo: Repository, manifest: Manifest, pgdata: str) -> rsteps.RestoreResult:
    res = rsteps.restore_physical(cfg, repo, manifest, Path(pgdata))
    logger().info("verified and extracted %s into %s in %.1fs", human_bytes(res.raw_bytes),
                  res.target, res.seconds)
    return res


@task(name="restore-logical", cache_policy=NO_CACHE)
def restore_logical(cfg: Config, repo: Repository, manifest: Manifest, dsn: str, jobs: int) -> rsteps.RestoreResult:
    res = rsteps.restore_logical(cfg, repo, manifest, dsn, jobs)
    logger().info("restored %s into %s in %.1fs", manifest.id, res.target, res.seconds)
    return res


@task(name="start-restored-server", cache_policy=NO_CACHE)
def start_restored_server(cfg: Config, pgdata: str, port: int) -> int:
    rsteps.set_port(Path(pgdata), port, cfg.postgres.os_user)
    cluster = LocalCluster(Path(pgdata), port, os_user=cfg.postgres.os_user, bindir=cfg.postgres.bindir)
    cluster.start(timeout=3600)
    cluster.wait_ready()
    logger().info("restored server is up on 127.0.0.1:%d", port)
    return port


@flow(name="restore")
def restore_flow(
    config_path: str | None = None,
    backup: str = "latest",
    pgdata: str | None = None,
    dsn: str | None = None,
    start: bool = False,
    port: int | None = None,
    jobs: int = 2,
) -> RestoreReport:
    """Restore a physical backup into an empty data directory, or a logical one into an empty database."""
    cfg, repo = load(config_path)
    if (pgdata is None) == (dsn is None):
        raise PreconditionFailed("restore needs exactly one of --pgdata (physical) or --dsn (logical)")
    t0 = time.monotonic()
    kind = "physical" if pgdata else "logical"
    manifest = select_backup(repo, backup, kind if backup == "latest" else None, cfg.cluster)
    try:
        if pgdata:
            res = restore_physical(cfg, repo, manifest, pgdata)
        else:
            assert dsn is not None
            res = restore_logical(cfg, repo, manifest, dsn, jobs)
        report = RestoreReport(backup_id=manifest.id, kind=manifest.kind, target=res.target,
                               raw_bytes=res.raw_bytes, seconds=res.seconds,
                               verify_seconds=res.verify_seconds)
        if pgdata and start:
            report.port = start_restored_server(cfg, pgdata, port or free_port())
            report.started = True
        report.seconds = time.monotonic() - t0
    except BaseException as exc:
        create_markdown_artifact(
            key=f"restore-report-{cfg.cluster}".replace("_", "-"),
            markdown=f"# Restore of {manifest.id}: FAILED\n\n`{one_line(exc)}`\n\n"
            "The target was left empty; nothing was half-restored.\n",
        )
        raise
    target = report.target if pgdata else safe_dsn(dsn or "")
    create_markdown_artifact(
        key=f"restore-report-{cfg.cluster}".replace("_", "-"),
        markdown=(
            f"# Restore of {manifest.id}: complete\n\n| | |\n|---|---|\n| kind | {manifest.kind} |\n"
            f"| target | {target} |\n| data | {human_bytes(report.raw_bytes)} |\n"
            f"| verify | {report.verify_seconds:.1f} s |\n| total (RTO) | {report.seconds:.1f} s |\n"
            f"| started | {f'port {report.port}' if report.started else 'no'} |\n"
        ),
    )
    return report
