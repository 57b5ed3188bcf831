"""Orchestration: the restore flow — choose a backup, verify it, restore, optionally start.

A physical restore recovers to the end of the WAL archive, or to a point in time (a time, an
LSN, a named restore point or a transaction id): the recovery settings go into the restored
data directory, and with ``start`` the flow waits for the promotion and reports the point the
server itself says it reached, failing when that is short of the target."""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field, WithJsonSchema

from flows.common import NETWORK_RETRIES, human_bytes, load, logger, publish_report
from flows.heartbeat import send_heartbeat
from flows.node_step import call_node_step
from flows.params import BackupRef, ConfigPath, OptionalPort, OptionalText, OptionalTextList, OptionalTime
from tasks import recovery as rec
from tasks import restore as rsteps
from tasks import walarchive, walspool
from tasks.config import Config, Node
from tasks.config import config_path as resolve_config_path
from tasks.errors import DRError, PreconditionFailed, one_line
from tasks.failover import NodeState
from tasks.models import Manifest
from tasks.node_steps import HERE, NodeStepArgs, describe_location, step_location
from tasks.noderestore import (
    NodeRestoreRequest,
    PreparedPgdata,
    carry_node_settings,
    find_node,
    plan_node_restore,
    prepare_node_pgdata,
    restore_role_event,
)
from tasks.pgcluster import LocalCluster, free_port
from tasks.postgres import dsn_field, safe_dsn
from tasks.replay import ArchiveView, archive_view, describe_archive_view
from tasks.reporting import bullets, document, kv_table, report_key, section
from tasks.repository import Repository
from tasks.topology import observe_configured_nodes


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
    node: str | None = None  # a restore into a configured node's data directory
    runs_on: str | None = None  # where it ran: "here" or "pool:<work pool>"
    host: str | None = None  # the host that wrote the data directory
    stopped: str | None = None  # the node's server, stopped because the operator asked to replace it
    kept_aside: str | None = None  # the node's previous data directory, moved aside (never deleted)
    node_settings: list[str] = []  # the node's own configuration files carried into the restored directory
    role_change: str | None = None  # what the role history says after a started node restore


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
    early_prefetcher: int | None = None,
    checked: bool = False,
) -> None:
    if not checked:
        rec.check_server_can_read(config_file, cfg, cfg.postgres.os_user)
    rec.write_recovery_settings(
        Path(pgdata),
        config_path=config_file,
        target=target,
        os_user=cfg.postgres.os_user,
        keep_archiving=keep_archiving,
    )
    if early_prefetcher is not None:
        rec.adopt_early_prefetcher(Path(pgdata), early_prefetcher, cfg.postgres.os_user)
    if start_wal:
        walspool.prime_prefetch(Path(pgdata), start_wal, config_file, cfg.repository)
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
    host: str = "127.0.0.1",
) -> int:
    rsteps.set_port(Path(pgdata), port, cfg.postgres.os_user)
    cluster = LocalCluster(
        Path(pgdata), port, host=host, os_user=cfg.postgres.os_user, bindir=cfg.postgres.bindir
    )
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
    logger().info("restored server is up on %s:%d", host, port)
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
    host: str = "127.0.0.1",
) -> rec.RecoveryOutcome:
    cluster = LocalCluster(
        Path(pgdata), port, host=host, os_user=cfg.postgres.os_user, bindir=cfg.postgres.bindir
    )
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
def stop_restored_server(cfg: Config, pgdata: str, port: int, host: str = "127.0.0.1") -> str:
    cluster = LocalCluster(
        Path(pgdata), port, host=host, os_user=cfg.postgres.os_user, bindir=cfg.postgres.bindir
    )
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
    if report.node:
        rows += [
            ("node", f"{report.node} ({describe_location(report.runs_on)}, host {report.host or '?'})"),
            ("its server", report.stopped or "was not running"),
            ("its previous data directory", f"kept in {report.kept_aside}" if report.kept_aside else "none"),
            ("its own settings kept", ", ".join(report.node_settings) or "-"),
            ("role history", report.role_change or "unchanged (not started)"),
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


def _restore_data(
    cfg: Config,
    repo: Repository,
    manifest: Manifest,
    pgdata: str,
    ts_map: dict[str, str],
    config_file: str | None,
) -> rsteps.RestoreResult:
    """The data step; with a restore_command to come, whether its OS user can run gravl-dr and
    read the config and the repository is checked (processes started as that user) while the
    data is written, not after it."""
    with ThreadPoolExecutor(1, thread_name_prefix="check-server-can-read") as pool:
        checking = (
            pool.submit(rec.check_server_can_read, config_file, cfg, cfg.postgres.os_user)
            if config_file is not None
            else None
        )
        res = restore_physical(cfg, repo, manifest, pgdata, ts_map)
        if checking is not None:
            checking.result()
    return res


def restore_into_pgdata(
    cfg: Config,
    repo: Repository,
    manifest: Manifest,
    pgdata: str,
    *,
    config_path: str | None,
    target: rec.RecoveryTarget,
    ts_map: dict[str, str],
    start: bool,
    port: int | None,
    keep_archiving: bool,
    recovery_timeout: float,
    host: str = "127.0.0.1",
    prepared: PreparedPgdata | None = None,
) -> RestoreReport:
    """The physical restore's steps on the host that has ``pgdata``: the restore flow's, and a
    node's `restore` step's (one code path). ``prepared``: a node's directory made ready for it."""
    t0 = time.monotonic()
    view = inspect_wal_archive(repo, manifest)
    rsteps.check_archive_reaches(view, manifest, target)
    use_archive = view.has_wal_after_backup or target.kind != "end"
    config_file = str(resolve_config_path(config_path).absolute()) if use_archive else None
    early = None
    if start and config_file is not None:
        # the WAL prefetcher starts now and waits for the recovery settings: the data step
        # hides its start, and PostgreSQL's first restore_command call finds it running
        early = rec.spawn_early_prefetcher(
            Path(pgdata), config_file, cfg.postgres.os_user, rec.repository_env(cfg)
        )
    try:
        res = _restore_data(cfg, repo, manifest, pgdata, ts_map, config_file)
        settings = keep_node_settings(cfg, prepared) if prepared is not None else []
        if config_file is not None:
            write_recovery_settings(
                cfg, config_file, pgdata, target, keep_archiving, manifest.start_wal, early, checked=True
            )
    except BaseException:
        if early is not None:
            rec.end_early_prefetcher(Path(pgdata), early)
        raise
    report = RestoreReport(
        backup_id=manifest.id,
        kind=manifest.kind,
        target=res.target,
        raw_bytes=res.raw_bytes,
        seconds=res.seconds,
        verify_seconds=res.verify_seconds,
        data_seconds=res.seconds,
        target_point=target.describe(),
        archive_used=use_archive,
        node_settings=settings,
    )
    report.not_carried_over = rsteps.restore_notes(manifest)
    for note in report.not_carried_over:
        logger().warning("%s", note)
    if start:
        report.port = port or free_port()
        try:
            start_restored_server(
                cfg, pgdata, report.port, target if use_archive else None, config_file, host=host
            )
            report.started = True
            outcome = (
                wait_for_recovery(
                    cfg, pgdata, report.port, target, view, manifest, recovery_timeout, host=host
                )
                if use_archive
                else None
            )
        except BaseException as exc:
            # never leave a server up, promoted and writable, short of what was asked
            stopped = stop_restored_server(cfg, pgdata, report.port, host=host)
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
    return report


# ------------------------------------------------------------------ a restore into a configured node


@task(name="check-node-roles", cache_policy=NO_CACHE)
def check_node_roles(cfg: Config) -> list[NodeState]:
    """Every configured node as libpq sees it now: who runs, who accepts writes."""
    states = observe_configured_nodes(cfg)
    for s in states:
        logger().info("%s: %s", s.name, s.evidence())
    return states


@task(name="prepare-node-data-directory", cache_policy=NO_CACHE)
def prepare_node_data_directory(cfg: Config, node: Node, replace_existing: bool) -> PreparedPgdata:
    prepared = prepare_node_pgdata(cfg, node, replace_existing=replace_existing)
    logger().info(
        "%s: data directory %s ready for the restore; %s; %s",
        node.name,
        prepared.pgdata,
        prepared.stopped or "no server was running",
        f"its previous contents kept in {prepared.kept_aside}" if prepared.kept_aside else "it was empty",
    )
    return prepared


@task(name="keep-node-settings", cache_policy=NO_CACHE)
def keep_node_settings(cfg: Config, prepared: PreparedPgdata) -> list[str]:
    carried = carry_node_settings(prepared, os_user=cfg.postgres.os_user)
    if carried:
        logger().info("kept the node's own %s (from %s)", ", ".join(carried), prepared.settings_from)
    elif prepared.kept_aside:
        logger().warning(
            "no earlier data directory of this node holds its own settings: the backup's configuration is used"
        )
    return carried


def _node_address(node: Node) -> tuple[str, int]:
    """Where the node's restored server listens, as its dsn says (libpq's default port 5432)."""
    host = dsn_field(node.dsn, "host") or dsn_field(node.dsn, "hostaddr") or "127.0.0.1"
    port = (dsn_field(node.dsn, "port") or "5432").split(",")[0]
    # gravl-dr starts servers without a Unix socket (pg_ctl -o "-k ''"): reach it over TCP
    return ("127.0.0.1" if host.startswith("/") else host.split(",")[0]), int(port)


def restore_on_node_here(
    cfg: Config, repo: Repository, node: Node, req: NodeRestoreRequest, config_path: str | None
) -> RestoreReport:
    """A restore into ``node``'s data directory on this host: in the restore flow when this config
    has its pgdata, and in the node's own `restore` step on its worker otherwise."""
    target = rec.RecoveryTarget.from_options(
        time=req.target_time, lsn=req.target_lsn, name=req.target_name, xid=req.target_xid
    )
    manifest = select_backup(repo, req.backup, cfg.cluster, "physical", target)
    host, node_port = _node_address(node)
    prepared = prepare_node_data_directory(cfg, node, req.replace_existing)
    try:
        report = restore_into_pgdata(
            cfg,
            repo,
            manifest,
            prepared.pgdata,
            config_path=config_path,
            target=target,
            ts_map=rsteps.parse_tablespace_map(req.tablespace_map),
            start=req.start,
            port=req.port or node_port,
            keep_archiving=req.keep_archiving,
            recovery_timeout=req.recovery_timeout,
            host=host,
            prepared=prepared,
        )
    except DRError as exc:
        if prepared.kept_aside is None:
            raise
        raise type(exc)(
            f"{one_line(exc)}; {node.name}'s previous data directory is kept in {prepared.kept_aside}"
        ) from exc
    return report.model_copy(
        update={
            "node": node.name,
            "host": socket.gethostname(),
            "stopped": prepared.stopped,
            "kept_aside": prepared.kept_aside,
        }
    )


@task(name="record-role-change", cache_policy=NO_CACHE)
def record_restore_role_change(cfg: Config, repo: Repository, report: RestoreReport) -> str:
    """A started node restore promoted it: record that in the role history (never fails the run)."""
    from tasks.roles import now, record_role_change, role_history

    assert report.node is not None
    try:
        event = restore_role_event(
            role_history(repo),
            cfg.primary.name,
            report.node,
            timeline=report.timeline,
            backup_id=report.backup_id,
            at=now(),
        )
        if event is None:
            return f"unchanged: it already names {report.node} the primary"
        key = record_role_change(repo, event)
    except DRError as exc:
        logger().warning("role change NOT recorded: %s", one_line(exc))
        return f"NOT recorded ({one_line(exc)}): `gravl-dr guard` cannot know the old primary was demoted"
    logger().info("recorded %s: %s primary, %s demoted", key, event.primary, ", ".join(event.demoted))
    return f"recorded {key}: {event.primary} primary, {', '.join(event.demoted)} demoted"


def _restore_on_node(
    cfg: Config, repo: Repository, node_name: str, req: NodeRestoreRequest, config_path: str | None
) -> tuple[RestoreReport, Manifest]:
    """Plan from libpq (refuse before anything is touched), then restore where the node's files are."""
    node = find_node(cfg, node_name)
    where = step_location(node)
    plan_node_restore(
        node, where, check_node_roles(cfg), replace_existing=req.replace_existing, start=req.start
    )
    target = rec.RecoveryTarget.from_options(
        time=req.target_time, lsn=req.target_lsn, name=req.target_name, xid=req.target_xid
    )
    manifest = select_backup(repo, req.backup, cfg.cluster, "physical", target)
    req = req.model_copy(update={"backup": manifest.id})  # the node restores exactly this one
    if where == HERE:
        report = restore_on_node_here(cfg, repo, node, req, config_path)
    else:
        # validate here first: a target past the archive never reaches the node
        rsteps.check_archive_reaches(inspect_wal_archive(repo, manifest), manifest, target)
        step_timeout = cfg.node_steps.timeout_seconds + (req.recovery_timeout if req.start else 0)
        res = call_node_step(
            cfg,
            node,
            "restore",
            NodeStepArgs(restore=req.model_dump_json()),
            where=where,
            step_timeout=step_timeout,
        )
        report = RestoreReport.model_validate(res.payload)
        logger().info(
            "%s restored %s into %s on host %s (%s)",
            node.name,
            manifest.id,
            report.target,
            report.host,
            describe_location(where),
        )
    return report.model_copy(update={"runs_on": where}), manifest


@flow(name="restore", on_running=[send_heartbeat])
def restore_flow(
    config_path: ConfigPath = None,
    backup: BackupRef = "latest",
    pgdata: OptionalText = None,
    dsn: OptionalText = None,
    node: OptionalText = None,
    replace_existing: bool = False,
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
    archive or to a target), or into a configured node's data directory (on the node's own host,
    through its work pool), or a logical one: the whole cluster into a fresh cluster, or one
    database (``database``) into an existing empty database.

    Args:
        config_path: The gravl-dr config file; empty: $GRAVL_DR_CONFIG of the worker, then
            gravl-dr.yaml in its working directory.
        backup: The backup to restore: an id as `gravl-dr list` prints it, or latest (the newest
            backup that fits: physical for a data directory, logical for a database).
        pgdata: Physical restore: an empty (or absent) data directory on the worker's host.
            Give this, node or dsn: one of them.
        dsn: Logical restore: the empty database to restore into, as a libpq connection string
            without a password (the worker's .pgpass or PGPASSFILE supplies it).
        node: Physical restore into this configured node's data directory: here when this
            config has its pgdata, else as a `restore` node step on the node's work_pool. Never
            into a node that accepts writes.
        replace_existing: node: restore even when the node's server runs (a standby: it is
            stopped) or its data directory is not empty (it is moved aside, kept, and reported).
        start: Physical restore: start the restored server and wait for its recovery to finish.
        port: Port for the started server; empty: a free port (node: the port of its dsn).
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
    if node is not None:
        if pgdata is not None or dsn is not None:
            raise PreconditionFailed(
                "restore needs exactly one of --node, --pgdata (physical) or --dsn (logical)"
            )
        req = NodeRestoreRequest(
            backup=backup,
            target_time=target_time.isoformat() if target_time else None,
            target_lsn=target_lsn,
            target_name=target_name,
            target_xid=target_xid,
            start=start,
            port=port,
            keep_archiving=keep_archiving,
            recovery_timeout=recovery_timeout,
            tablespace_map=list(tablespace_map or []),
            replace_existing=replace_existing,
        )
        t0 = time.monotonic()
        try:
            report, manifest = _restore_on_node(cfg, repo, node, req, config_path)
            if report.started:
                report.role_change = record_restore_role_change(cfg, repo, report)
        except BaseException as exc:
            publish_report(
                report_key("restore", cfg.cluster),
                f"# Restore into node {node}: FAILED\n\n`{one_line(exc)}`\n\n"
                "Nothing was restored where a step refused before acting; otherwise do not start the "
                "node's data directory, and read the error for where its previous contents are kept.\n",
            )
            raise
        report.seconds = time.monotonic() - t0
        where = f"node {node}: {report.target}"
        publish_report(report_key("restore", cfg.cluster), _markdown(manifest, report, where, True))
        return report
    rsteps.check_restore_request(pgdata, dsn, target)
    t0 = time.monotonic()
    kind = "physical" if pgdata else "logical"
    manifest = select_backup(repo, backup, cfg.cluster, kind, target)
    try:
        if pgdata:
            report = restore_into_pgdata(
                cfg,
                repo,
                manifest,
                pgdata,
                config_path=config_path,
                target=target,
                ts_map=ts_map,
                start=start,
                port=port,
                keep_archiving=keep_archiving,
                recovery_timeout=recovery_timeout,
            )
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
            report.databases = (
                [d.name for d in manifest.databases if d.object]
                if whole
                else [database or manifest.database or "?"]
            )
            for note in report.not_carried_over:
                logger().warning("%s", note)
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
