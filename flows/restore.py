"""Orchestration: the restore flow — choose a backup, verify it, restore, optionally start.

A physical restore recovers to the end of the WAL archive, or to a point in time (a time, an
LSN, a named restore point or a transaction id): the recovery settings go into the restored
data directory, and with ``start`` the flow waits for the promotion and reports the point the
server itself says it reached, failing when that is short of the target."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field, WithJsonSchema

from flows.common import NETWORK_RETRIES, human_bytes, load, logger, publish_report
from flows.params import BackupRef, ConfigPath, OptionalPort, OptionalText, OptionalTextList, OptionalTime
from tasks import recovery as rec
from tasks import restore as rsteps
from tasks import walarchive, walspool
from tasks.config import Config
from tasks.config import config_path as resolve_config_path
from tasks.errors import DRError, PreconditionFailed, one_line
from tasks.models import Manifest
from tasks.pgcluster import LocalCluster, free_port
from tasks.postgres import safe_dsn
from tasks.replay import ArchiveView, archive_view, describe_archive_view
from tasks.reporting import bullets, document, kv_table, report_key, section
from tasks.repository import Repository


class RestoreReport(BaseModel):
    backup_id: str
    kind: str
    target: str
    raw_bytes: int
    seconds: float
    verify_seconds: float
    data_seconds: float = 0.0
    started: bool = False
    port: int | None = None
    target_point: str = "end of the archive"
    archive_used: bool = False
    reached_lsn: str | None = None
    last_xact_time: str | None = None
    timeline: int | None = None
    stop_message: str | None = None
    recovery_seconds: float | None = None
    databases: list[str] = []
    not_carried_over: list[str] = []


@task(name="restore-physical", cache_policy=NO_CACHE)
def restore_physical(
    cfg: Config, repo: Repository, manifest: Manifest, pgdata: str, tablespace_map: dict[str, str]
) -> rsteps.RestoreResult:
    res = rsteps.restore_physical(cfg, repo, manifest, Path(pgdata), tablespace_map)
    logger().info(
        "verified and extracted %s into %s in %.1fs", human_bytes(res.raw_bytes), res.target, res.seconds
    )
    for space in manifest.tablespaces:
        where = tablespace_map.get(space.location.rstrip("/"), space.location)
        logger().info("tablespace %s restored into %s", space.name, where)
    return res


@task(name="restore-logical", cache_policy=NO_CACHE)
def restore_logical(
    cfg: Config,
    repo: Repository,
    manifest: Manifest,
    dsn: str,
    jobs: int,
    database: str | None,
    no_owner: bool,
) -> rsteps.RestoreResult:
    res = rsteps.restore_logical(cfg, repo, manifest, dsn, jobs, no_owner=no_owner, database=database)
    logger().info("restored %s into %s in %.1fs", manifest.id, res.target, res.seconds)
    return res


@task(name="restore-cluster", cache_policy=NO_CACHE)
def restore_cluster(
    cfg: Config, repo: Repository, manifest: Manifest, dsn: str, jobs: int, tablespace_map: dict[str, str]
) -> rsteps.ClusterRestoreResult:
    res = rsteps.restore_cluster(cfg, repo, manifest, dsn, jobs, tablespace_map=tablespace_map)
    logger().info(
        "restored the globals and %d database(s) of %s into %s in %.1fs: %s",
        len(res.databases),
        manifest.id,
        res.target,
        res.seconds,
        ", ".join(res.databases),
    )
    for line in res.skipped:
        logger().warning("not in the backup: %s", line)
    return res


@task(name="select-backup", cache_policy=NO_CACHE, **NETWORK_RETRIES)
def select_backup(
    repo: Repository, ref: str, cluster: str, kind: str, target: rec.RecoveryTarget
) -> Manifest:
    manifest = rec.select_backup_for_restore(repo, ref, cluster, kind, target)
    logger().info(
        "restoring backup %s (%s, %s, ended %s at %s) to reach %s",
        manifest.id,
        manifest.kind,
        human_bytes(manifest.raw_bytes),
        manifest.stop_time.isoformat(),
        manifest.stop_lsn,
        target.describe(),
    )
    return manifest


@task(name="inspect-wal-archive", cache_policy=NO_CACHE, **NETWORK_RETRIES)
def inspect_wal_archive(repo: Repository, manifest: Manifest) -> ArchiveView:
    view = archive_view(walarchive.list_archive(repo), manifest)
    logger().info("%s", describe_archive_view(view, manifest))
    return view


@task(name="write-recovery-settings", cache_policy=NO_CACHE)
def write_recovery_settings(
    cfg: Config,
    config_file: str,
    pgdata: str,
    target: rec.RecoveryTarget,
    keep_archiving: bool,
    start_wal: str | None = None,
) -> None:
    rec.check_server_can_read(config_file, cfg, cfg.postgres.os_user)
    rec.write_recovery_settings(
        Path(pgdata),
        config_path=config_file,
        target=target,
        os_user=cfg.postgres.os_user,
        keep_archiving=keep_archiving,
    )
    if start_wal:
        walspool.prime_prefetch(Path(pgdata), start_wal)
    logger().info(
        "wrote recovery.signal and recovery settings: %s, restore_command %s, "
        "timeline latest, then promote%s",
        target.describe(),
        rec.restore_command(config_file),
        "" if keep_archiving else ", archive_mode off",
    )


@task(name="start-restored-server", cache_policy=NO_CACHE)
def start_restored_server(
    cfg: Config,
    pgdata: str,
    port: int,
    target: rec.RecoveryTarget | None = None,
    config_file: str | None = None,
) -> int:
    rsteps.set_port(Path(pgdata), port, cfg.postgres.os_user)
    cluster = LocalCluster(Path(pgdata), port, os_user=cfg.postgres.os_user, bindir=cfg.postgres.bindir)
    if config_file is not None:
        rec.start_prefetcher(Path(pgdata), config_file, cfg.postgres.os_user, rec.repository_env(cfg))
    try:
        cluster.start(timeout=3600, env=rec.repository_env(cfg))
    except DRError:
        # the server aborted recovery (a corrupt or missing segment, a target past the archive)
        why = rec.explain_failed_start(cluster.logfile, target or rec.RecoveryTarget())
        if why is None:
            raise
        raise PreconditionFailed(why) from None
    if target is None:
        cluster.wait_ready()
    # else pg_ctl -w saw it accept connections; wait-for-recovery follows it from there (and
    # explains a server that stops: a fast recovery can end, short of a target, within a second)
    logger().info("restored server is up on 127.0.0.1:%d", port)
    return port


@task(name="wait-for-recovery", cache_policy=NO_CACHE)
def wait_for_recovery(
    cfg: Config,
    pgdata: str,
    port: int,
    target: rec.RecoveryTarget,
    view: ArchiveView,
    manifest: Manifest,
    timeout: float,
) -> rec.RecoveryOutcome:
    cluster = LocalCluster(Path(pgdata), port, os_user=cfg.postgres.os_user, bindir=cfg.postgres.bindir)
    outcome = rec.wait_for_recovery(cluster, target, timeout)
    parent = rec.read_history_switchpoint(Path(pgdata), outcome.timeline)
    followed = parent[0] if parent else manifest.timeline
    end = view.newest_segment_start.get(followed)
    logger().info(
        "recovery finished in %.1fs: promoted on timeline %d at %s; last replayed "
        "transaction committed at %s; server says: %s",
        outcome.seconds,
        outcome.timeline,
        outcome.reached_lsn,
        outcome.last_xact_time,
        outcome.stop_message or "end of WAL",
    )
    rec.check_outcome(target, outcome, archive_end_lsn=end, backup_stop_lsn=manifest.stop_lsn)
    rec.clear_prefetch(Path(pgdata))
    return outcome


@task(name="stop-restored-server", cache_policy=NO_CACHE)
def stop_restored_server(cfg: Config, pgdata: str, port: int) -> str:
    cluster = LocalCluster(Path(pgdata), port, os_user=cfg.postgres.os_user, bindir=cfg.postgres.bindir)
    what = rec.stop_after_failed_recovery(cluster)
    logger().warning("recovery failed: %s", what)
    return what


LSN_PATTERN = r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$"


def _markdown(manifest: Manifest, report: RestoreReport, where: str, physical_target: bool) -> str:
    rows: list[tuple[str, object]] = [
        ("kind", manifest.kind),
        ("target", where),
        ("data", human_bytes(report.raw_bytes)),
        ("verification", "while reading, one pass"),
        ("total (RTO)", f"{report.seconds:.1f} s"),
        ("started", f"port {report.port}" if report.started else "no"),
    ]
    if physical_target:
        rows += [
            ("recovery target", report.target_point),
            ("WAL archive used", "yes" if report.archive_used else "no (nothing after the backup)"),
        ]
    if report.reached_lsn:
        rows += [
            ("reached LSN", f"{report.reached_lsn} (timeline {report.timeline})"),
            ("last replayed transaction", report.last_xact_time or "-"),
            ("server's record", report.stop_message or "end of WAL"),
            ("recovery", f"{report.recovery_seconds or 0:.1f} s"),
        ]
    if report.databases:
        rows.append(("databases", ", ".join(report.databases)))
    lines = [f"# Restore of {manifest.id}: complete", "", *kv_table(rows)]
    if report.not_carried_over:
        lines += section("What PostgreSQL did not carry over", ["", *bullets(report.not_carried_over)])
    return document(lines)


@flow(name="restore")
def restore_flow(  # noqa: C901 - the runbook's steps in order; the decisions are in tasks.restore
    config_path: ConfigPath = None,
    backup: BackupRef = "latest",
    pgdata: OptionalText = None,
    dsn: OptionalText = None,
    start: bool = False,
    port: OptionalPort = None,
    jobs: Annotated[int, Field(ge=1, le=64)] = 2,
    target_time: OptionalTime = None,
    target_lsn: Annotated[str | None, WithJsonSchema({"type": "string", "pattern": LSN_PATTERN})] = None,
    target_name: OptionalText = None,
    target_xid: Annotated[str | None, WithJsonSchema({"type": "string", "pattern": r"^[0-9]{1,20}$"})] = None,
    keep_archiving: bool = False,
    recovery_timeout: Annotated[float, Field(gt=0, le=7 * 86400)] = 6 * 3600,
    tablespace_map: OptionalTextList = None,
    database: OptionalText = None,
    no_owner: bool = False,
) -> RestoreReport:
    """Restore a physical backup into an empty data directory (recovering to the end of the WAL
    archive or to a target), or a logical one: the whole cluster into a fresh cluster, or one
    database (``database``) into an existing empty database.

    Args:
        config_path: The gravl-dr config file; empty: $GRAVL_DR_CONFIG of the worker, then
            gravl-dr.yaml in its working directory.
        backup: The backup to restore: an id as `gravl-dr list` prints it, or latest (the newest
            backup that fits: physical for a data directory, logical for a database).
        pgdata: Physical restore: an empty (or absent) data directory on the worker's host.
            Give this or dsn, not both.
        dsn: Logical restore: the empty database to restore into, as a libpq connection string
            without a password (the worker's .pgpass or PGPASSFILE supplies it).
        start: Physical restore: start the restored server and wait for its recovery to finish.
        port: Port for the started server; empty: a free port.
        jobs: Logical restore: parallel pg_restore jobs.
        target_time: Point-in-time recovery: stop at this time (without a time zone: UTC).
            Give at most one target; none: recover to the end of the WAL archive.
        target_lsn: Point-in-time recovery: stop at this WAL position (e.g. 0/3000060).
        target_name: Point-in-time recovery: stop at this named restore point
            (pg_create_restore_point).
        target_xid: Point-in-time recovery: stop after this transaction id.
        keep_archiving: Let the restored server archive its own WAL with archive_command
            (off: archiving is disabled so a copy cannot write into the repository).
        recovery_timeout: Seconds the started server may take to recover before the run fails.
        tablespace_map: Physical restore, or a whole-cluster logical one: OLD=NEW, restoring the
            tablespace at directory OLD into NEW (as pg_basebackup -T); one entry per tablespace.
        database: Logical restore: only this database of a whole-cluster backup, into the
            existing empty database of dsn; empty: the whole cluster into the fresh cluster of dsn.
        no_owner: Logical restore of one database: objects belong to the connecting role, no GRANTs.
    """
    cfg, repo = load(config_path)
    ts_map = rsteps.parse_tablespace_map(tablespace_map)
    target = rec.RecoveryTarget.from_options(
        time=target_time.isoformat() if target_time else None,
        lsn=target_lsn,
        name=target_name,
        xid=target_xid,
    )
    rsteps.check_restore_request(pgdata, dsn, target)
    t0 = time.monotonic()
    kind = "physical" if pgdata else "logical"
    manifest = select_backup(repo, backup, cfg.cluster, kind, target)
    try:
        if pgdata:
            view = inspect_wal_archive(repo, manifest)
            rsteps.check_archive_reaches(view, manifest, target)
            res = restore_physical(cfg, repo, manifest, pgdata, ts_map)
            use_archive = view.has_wal_after_backup or target.kind != "end"
            if use_archive:
                config_file = str(resolve_config_path(config_path).absolute())
                write_recovery_settings(cfg, config_file, pgdata, target, keep_archiving, manifest.start_wal)
        else:
            assert dsn is not None
            whole = bool(manifest.databases) and database is None
            if whole:
                cres = restore_cluster(cfg, repo, manifest, dsn, jobs, ts_map)
                res = rsteps.RestoreResult(
                    cres.backup_id, cres.target, cres.raw_bytes, cres.seconds, cres.verify_seconds
                )
            else:
                res = restore_logical(cfg, repo, manifest, dsn, jobs, database, no_owner)
        report = RestoreReport(
            backup_id=manifest.id,
            kind=manifest.kind,
            target=res.target,
            raw_bytes=res.raw_bytes,
            seconds=res.seconds,
            verify_seconds=res.verify_seconds,
            data_seconds=res.seconds,
            target_point=target.describe(),
        )
        report.not_carried_over = rsteps.restore_notes(manifest)
        if dsn is not None:
            report.databases = (
                [d.name for d in manifest.databases if d.object]
                if whole
                else [database or manifest.database or "?"]
            )
        for note in report.not_carried_over:
            logger().warning("%s", note)
        if pgdata:
            report.archive_used = use_archive
        if pgdata and start:
            report.port = port or free_port()
            try:
                start_restored_server(
                    cfg,
                    pgdata,
                    report.port,
                    target if use_archive else None,
                    config_file if use_archive else None,
                )
                report.started = True
                outcome = (
                    wait_for_recovery(cfg, pgdata, report.port, target, view, manifest, recovery_timeout)
                    if use_archive
                    else None
                )
            except BaseException as exc:
                # never leave a server up, promoted and writable, short of what was asked
                stopped = stop_restored_server(cfg, pgdata, report.port)
                if isinstance(exc, DRError):
                    raise PreconditionFailed(f"{one_line(exc)}; {stopped}") from exc
                raise
            if outcome is not None:
                report.reached_lsn = outcome.reached_lsn
                report.last_xact_time = outcome.last_xact_time.isoformat() if outcome.last_xact_time else None
                report.timeline = outcome.timeline
                report.stop_message = outcome.stop_message
                report.recovery_seconds = outcome.seconds
        report.seconds = time.monotonic() - t0
    except BaseException as exc:
        publish_report(
            report_key("restore", cfg.cluster),
            f"# Restore of {manifest.id}: FAILED\n\n`{one_line(exc)}`\n\n"
            "The restore did not complete: do not use the target directory; empty it before "
            "trying again.\n",
        )
        raise
    where = report.target if pgdata else safe_dsn(dsn or "")
    publish_report(report_key("restore", cfg.cluster), _markdown(manifest, report, where, bool(pgdata)))
    return report
