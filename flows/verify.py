"""Orchestration: the ``verify`` flow — re-read a backup from the repository and prove it intact.

The CLI's ``gravl-dr verify`` does the same without Prefect (it must answer at once); this flow
is the operator's button for it in the UI, with a report: artifact ``verify-report-<cluster>``.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from flows.common import NETWORK_RETRIES, human_bytes, load, logger, publish_report
from flows.heartbeat import send_heartbeat
from flows.params import BackupKind, BackupRef, ConfigPath
from tasks import backup as steps
from tasks.config import Config
from tasks.errors import one_line
from tasks.models import Manifest, check_backup_ref
from tasks.reporting import document, kv_table, report_key
from tasks.repository import Repository


class VerifyReport(BaseModel):
    backup_id: str
    kind: str
    objects: int
    bytes_read: int
    seconds: float
    deep: bool


@task(name="pick-backup", cache_policy=NO_CACHE, **NETWORK_RETRIES)
def pick_backup(repo: Repository, ref: str, kind: str, cluster: str) -> Manifest:
    manifest = steps.resolve_backup(repo, ref, kind=kind if ref == "latest" else None, cluster=cluster)
    logger().info(
        "verifying backup %s (%s, %d object(s), %s stored)%s",
        manifest.id,
        manifest.kind,
        len(manifest.objects),
        human_bytes(manifest.stored_bytes),
        f": the newest {kind} backup" if ref == "latest" else "",
    )
    return manifest


@task(name="verify-backup", cache_policy=NO_CACHE, **NETWORK_RETRIES)
def verify_backup(cfg: Config, repo: Repository, manifest: Manifest, deep: bool) -> VerifyReport:
    key = steps.key_for_manifest(cfg, manifest) if deep else None
    res = steps.verify_objects(repo, manifest, deep=deep, key=key)
    logger().info(
        "backup %s OK: %d object(s), %s read, checksums match%s (%.1f s)",
        res.backup_id,
        res.objects,
        human_bytes(res.bytes_read),
        " (stored and decoded)" if deep else "",
        res.seconds,
    )
    return VerifyReport(
        backup_id=res.backup_id,
        kind=manifest.kind,
        objects=res.objects,
        bytes_read=res.bytes_read,
        seconds=res.seconds,
        deep=deep,
    )


@flow(name="verify", log_prints=False, on_running=[send_heartbeat])
def verify_flow(
    config_path: ConfigPath = None,
    backup: BackupRef = "latest",
    kind: BackupKind = "physical",
    deep: bool = True,
) -> VerifyReport:
    """Re-read every object of a backup and check its sizes and SHA-256 checksums.

    Args:
        config_path: The gravl-dr config file; empty: $GRAVL_DR_CONFIG of the worker, then
            gravl-dr.yaml in its working directory.
        backup: The backup to verify: an id as `gravl-dr list` prints it, or latest.
        kind: Which kind of backup latest means.
        deep: Also decompress (and decrypt) every object and check the original bytes' checksums;
            off: check the stored bytes only.
    """
    check_backup_ref(backup)
    cfg, repo = load(config_path)
    key = report_key("verify", cfg.cluster)
    try:
        manifest = pick_backup(repo, backup, kind, cfg.cluster)
        report = verify_backup(cfg, repo, manifest, deep)
    except BaseException as exc:
        publish_report(
            key,
            f"# Verify of {backup}: FAILED\n\n`{one_line(exc)}`\n\nDo not count on this backup: "
            "take a new one, then find out what damaged it (the error names the object).\n",
            f"verify {backup}: FAILED",
        )
        raise
    rows: list[tuple[str, object]] = [
        ("kind", report.kind),
        ("objects", report.objects),
        ("read", human_bytes(report.bytes_read)),
        ("checked", f"{'stored and decoded bytes' if deep else 'stored bytes'} (SHA-256)"),
        ("took", f"{report.seconds:.1f} s"),
    ]
    publish_report(
        key,
        document([f"# Verify of {report.backup_id}: OK", "", *kv_table(rows)]),
        f"verify {report.backup_id}: OK",
    )
    return report
