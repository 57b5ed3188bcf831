"""Orchestration: the backup flow — preflight, lock, stream, verify, publish manifest, report."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from flows.common import (
    NETWORK_RETRIES,
    follow_primary,
    human_bytes,
    load,
    logger,
    publish_report,
    push_flow_metrics,
)
from flows.heartbeat import send_heartbeat
from flows.params import BackupKind, ConfigPath
from tasks import backup as steps
from tasks.config import Config
from tasks.errors import one_line
from tasks.models import Manifest
from tasks.reporting import bullets, document, kv_table, report_key, section
from tasks.repository import Repository


class BackupReport(BaseModel):
    backup_id: str
    kind: str
    dry_run: bool
    raw_bytes: int = 0
    stored_bytes: int = 0
    stream_seconds: float = 0.0
    verify_seconds: float = 0.0
    total_seconds: float = 0.0
    start_lsn: str | None = None
    stop_lsn: str | None = None
    messages: list[str] = []
    databases: list[str] = []
    warnings: list[str] = []
    node: str | None = None  # the node backed up: the primary when the backup ran


@task(name="preflight", cache_policy=NO_CACHE, **NETWORK_RETRIES)
def preflight(cfg: Config, repo: Repository, kind: str) -> steps.Preflight:
    pre = steps.preflight(cfg, repo, kind)
    for line in pre.messages:
        logger().info(line)
    logger().info(
        "backup %s will be written to %s (%s%s)",
        pre.backup_id,
        repo.url,
        pre.codec,
        ", encrypted" if pre.encrypted else "",
    )
    return pre


@task(name="acquire-backup-lock", cache_policy=NO_CACHE, **NETWORK_RETRIES)
def acquire_backup_lock(repo: Repository, backup_id: str) -> None:
    steps.acquire_lock(repo, backup_id)
    logger().info("took the repository lock for %s", backup_id)


@task(name="stream-backup", cache_policy=NO_CACHE, **NETWORK_RETRIES)
def stream_backup(cfg: Config, repo: Repository, pre: steps.Preflight) -> steps.StreamResult:
    res = steps.stream_backup(cfg, repo, pre)
    for obj in res.objects:
        logger().info(
            "stored %s: %s raw -> %s stored in %.1fs (%.0f MiB/s)",
            obj.key,
            human_bytes(obj.raw_size),
            human_bytes(obj.size),
            res.seconds,
            obj.raw_size / max(res.seconds, 1e-6) / 2**20,
        )
    return res


@task(name="verify-backup", cache_policy=NO_CACHE, **NETWORK_RETRIES)
def verify_backup(repo: Repository, manifest: Manifest) -> steps.VerifyResult:
    res = steps.verify_objects(repo, manifest)
    logger().info(
        "re-read %d object(s), %s: sizes and SHA-256 match", res.objects, human_bytes(res.bytes_read)
    )
    return res


@task(name="publish-manifest", cache_policy=NO_CACHE, **NETWORK_RETRIES)
def publish_manifest(repo: Repository, manifest: Manifest) -> str:
    key = steps.publish_manifest(repo, manifest)
    logger().info("manifest written to %s: backup %s is complete", key, manifest.id)
    return key


@task(name="release-backup-lock", cache_policy=NO_CACHE)
def release_backup_lock(repo: Repository, backup_id: str) -> None:
    if not steps.release_lock(repo, backup_id):
        logger().warning(
            "the repository lock of %s is left behind; the next backup takes it "
            "over (its backup is over), or run gravl-dr unlock",
            backup_id,
        )


@task(name="discard-incomplete-backup", cache_policy=NO_CACHE)
def discard_incomplete_backup(repo: Repository, backup_id: str) -> None:
    removed = steps.discard_incomplete(repo, backup_id)
    logger().warning("backup %s failed: removed %d partial object(s); it is not listed", backup_id, removed)


@task(name="push-backup-metrics", cache_policy=NO_CACHE)
def push_backup_metrics(cfg: Config, kind: str, report: BackupReport | None, failed: bool) -> None:
    now = time.time()
    if failed or report is None:
        values = {"gravl_backup_last_failure_timestamp_seconds": now}
    else:
        values = {
            "gravl_backup_last_success_timestamp_seconds": now,
            "gravl_backup_duration_seconds": report.total_seconds,
            "gravl_backup_raw_bytes": float(report.raw_bytes),
            "gravl_backup_stored_bytes": float(report.stored_bytes),
            "gravl_backup_stream_seconds": report.stream_seconds,
        }
    push_flow_metrics(cfg, "backup", values, kind=kind)


def _markdown(report: BackupReport, repo_url: str, error: str | None = None) -> str:
    ratio = report.raw_bytes / report.stored_bytes if report.stored_bytes else 0.0
    thr = report.raw_bytes / report.stream_seconds / 2**20 if report.stream_seconds else 0.0
    status = "FAILED" if error else ("dry run: nothing written" if report.dry_run else "complete")
    rows: list[tuple[str, object]] = [("kind", report.kind), ("repository", repo_url)]
    if report.databases:
        rows.append(("databases", ", ".join(report.databases)))
    rows += [
        ("raw size", human_bytes(report.raw_bytes)),
        ("stored size", f"{human_bytes(report.stored_bytes)} (ratio {ratio:.2f})"),
        ("stream", f"{report.stream_seconds:.1f} s ({thr:.0f} MiB/s)"),
        ("verify", f"{report.verify_seconds:.1f} s"),
        ("total", f"{report.total_seconds:.1f} s"),
        ("WAL", f"{report.start_lsn or '-'} .. {report.stop_lsn or '-'}"),
    ]
    lines = [f"# Backup {report.backup_id}: {status}", "", *kv_table(rows)]
    if report.warnings:
        lines += section("Not in this backup", bullets(report.warnings))
    if report.messages:
        lines += section("Checks", bullets(report.messages))
    if error:
        lines += [
            "",
            "## What failed",
            f"`{error}`",
            "",
            "Nothing of this attempt is listed; fix the cause and run the backup again.",
        ]
    return document(lines)


@flow(name="backup", log_prints=False, on_running=[send_heartbeat])
def backup_flow(
    config_path: ConfigPath = None,
    kind: BackupKind = "physical",
    dry_run: bool = False,
) -> BackupReport:
    """Take a physical (pg_basebackup) or logical (pg_dump) backup into the repository.

    Args:
        config_path: The gravl-dr config file; empty: $GRAVL_DR_CONFIG of the worker, then
            gravl-dr.yaml in its working directory.
        kind: physical: the whole cluster with pg_basebackup (restores to any point in time with
            the WAL archive); logical: every database and the roles with pg_dump (restores into
            any PostgreSQL, no point in time).
        dry_run: Check the server, the repository and the lock only; store nothing.
    """
    t0 = time.monotonic()
    cfg, repo = load(config_path)
    artifact_key = report_key("backup", cfg.cluster)
    cfg = follow_primary(cfg, repo, "backup", artifact_key)
    pre = None
    report = None
    locked = False
    try:
        pre = preflight(cfg, repo, kind)
        report = BackupReport(
            backup_id=pre.backup_id,
            kind=kind,
            dry_run=dry_run,
            messages=list(pre.messages),
            node=cfg.primary.name,
        )
        if dry_run:
            report.total_seconds = time.monotonic() - t0
            publish_report(artifact_key, _markdown(report, repo.url), f"dry run of a {kind} backup")
            return report
        acquire_backup_lock(repo, pre.backup_id)
        locked = True
        res = stream_backup(cfg, repo, pre)
        manifest = steps.build_manifest(cfg, pre, res)
        ver = verify_backup(repo, manifest)
        publish_manifest(repo, manifest)
        report.raw_bytes, report.stored_bytes = manifest.raw_bytes, manifest.stored_bytes
        report.stream_seconds, report.verify_seconds = res.seconds, ver.seconds
        report.start_lsn, report.stop_lsn = res.start_lsn, res.stop_lsn
        report.databases = [d.name for d in manifest.databases if d.object]
        report.warnings = [
            f"database {d.name} NOT in the backup: {d.skipped}" for d in manifest.databases if d.skipped
        ]
        report.warnings += manifest.not_carried_over.backup_notes
        for line in report.warnings:
            logger().warning("%s", line)
        report.total_seconds = time.monotonic() - t0
    except BaseException as exc:
        # Only what this attempt created: a run refused at the lock wrote nothing to clean.
        if pre is not None and locked and not dry_run:
            try:
                discard_incomplete_backup(repo, pre.backup_id)
            except Exception as cleanup_exc:  # noqa: BLE001 - report the original error
                logger().error("cleanup failed: %s", one_line(cleanup_exc))
        failed = report or BackupReport(backup_id=pre.backup_id if pre else "-", kind=kind, dry_run=dry_run)
        failed.total_seconds = time.monotonic() - t0
        publish_report(artifact_key, _markdown(failed, repo.url, one_line(exc)), f"failed {kind} backup")
        if not dry_run:
            push_backup_metrics(cfg, kind, None, failed=True)
        raise
    finally:
        if locked and pre is not None:
            release_backup_lock(repo, pre.backup_id)
    publish_report(artifact_key, _markdown(report, repo.url), f"{kind} backup {report.backup_id}")
    push_backup_metrics(cfg, kind, report, failed=False)
    logger().info("backup %s complete at %s", report.backup_id, datetime.now(UTC).isoformat())
    return report
