"""Orchestration: the restore drill — prove a backup restores into a complete, consistent, usable
database, and say exactly what is wrong when it does not.

pick-backup -> provision-instance -> restore (+ pg_verifybackup before start) -> start-and-wait
(pausing just before the LSN the backup read its row counts and newest timestamps at, to compare
them exactly as the instance's own superuser; the documented fallback says why when it cannot)
-> open-databases (datallowconn = false ones too) -> checks (amcheck, Great Expectations suites)
-> usability -> verify-data-checksums (stopped)
-> report (JSON + markdown, uploaded to drills/<drill-id>/) -> metrics; teardown always runs.
Any failed check fails the flow (and the CLI exits non-zero).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from flows.common import NETWORK_RETRIES, human_bytes, load, logger, publish_report, push_flow_metrics
from flows.heartbeat import send_heartbeat
from flows.params import BackupKind, BackupRef, ConfigPath, OptionalTime
from tasks import backup as bsteps
from tasks import drill as dsteps
from tasks import expectations as gxsteps
from tasks import integrity
from tasks import restore as rsteps
from tasks.config import Config, config_path
from tasks.drill import CheckResult, DrillFailed, DrillInstance, DrillReport
from tasks.errors import DRError, PreconditionFailed, one_line
from tasks.models import Manifest
from tasks.recovery import (
    RecoveryOutcome,
    RecoveryTarget,
    repository_env,
    wait_for_pause,
    wait_for_recovery,
    write_recovery_settings,
)
from tasks.replay import (
    counts_lsn_in_reach,
    may_pass_backup_by_target,
    names_past_backup,
    past_backup,
    recovered_to,
    segment_to_find,
)
from tasks.reporting import report_key
from tasks.repository import Repository
from tasks.walarchive import find_object
from tasks.walformat import WalSettings


class RestoreStep(BaseModel):
    seconds: float
    raw_bytes: int
    checks: list[CheckResult]
    notes: dict[str, list[str]] = {}  # database -> what was not restored/checked, and why


class RecoveryStep(BaseModel):
    seconds: float
    recovered_to: datetime | None
    lsn: str | None
    timeline: int | None
    past_backup: bool
    check: CheckResult
    # Row counts compared while recovery was paused at the backup's consistent point (None when
    # they are compared on the promoted instance, or not at all).
    count_checks: list[CheckResult] | None = None
    counts_seconds: float = 0.0  # that pause: comparing, stopping, restarting
    instance: DrillInstance  # as its own superuser (resolved once the server runs)
    point: dsteps.CountPoint


# ---------------------------------------------------------------- steps


@task(name="validate-suites", cache_policy=NO_CACHE)
def validate_suites(cfg: Config, config_file: str | None) -> list[gxsteps.SuiteFile]:
    """Load Great Expectations and validate the user suites: a bad suite fails before any restore."""
    seconds = gxsteps.load_gx()
    logger().info("Great Expectations loaded in %.1fs", seconds)
    suites = gxsteps.load_suites(suites_dir(cfg, config_file))
    if suites:
        gxsteps.validate_suites(suites, datetime.now(UTC))
        logger().info("user suites: %s", ", ".join(f"{s.name} ({Path(s.path).name})" for s in suites))
    else:
        logger().info("no user suites configured (drill.suites_dir); the default suite still runs")
    return suites


@task(name="pick-backup", cache_policy=NO_CACHE, **NETWORK_RETRIES)
def pick_backup(
    repo: Repository, ref: str, cluster: str, target_time: datetime | None, kind: str = "physical"
) -> tuple[Manifest, str]:
    if ref == "latest":
        manifest, why = dsteps.choose_latest_backup(bsteps.list_backups(repo, cluster), kind, target_time)
    else:
        manifest, why = (
            bsteps.resolve_backup(repo, ref, cluster=cluster),
            f"backup {ref} named by the operator",
        )
    if target_time is not None:
        if manifest.kind != "physical":
            raise PreconditionFailed(
                f"backup {manifest.id} is logical: --target-time needs a physical backup"
            )
        if manifest.stop_time > target_time:
            raise PreconditionFailed(
                f"backup {manifest.id} ended at {manifest.stop_time.isoformat()}, after the target "
                f"{target_time.isoformat()}: pick an older backup"
            )
    logger().info(
        "drilling backup %s (%s, %s, ended %s): %s",
        manifest.id,
        manifest.kind,
        human_bytes(manifest.raw_bytes),
        manifest.stop_time.isoformat(),
        why,
    )
    return manifest, why


@task(name="provision-instance", cache_policy=NO_CACHE)
def provision_instance(cfg: Config, drill_id: str, kind: str = "physical") -> DrillInstance:
    from prefect.runtime import flow_run

    instance = dsteps.provision_instance(cfg, drill_id, flow_run_id=str(flow_run.id or "") or None, kind=kind)
    logger().info("throwaway instance: %s, port 127.0.0.1:%d", instance.workdir, instance.port)
    return instance


@task(name="restore", cache_policy=NO_CACHE)
def restore(
    cfg: Config,
    repo: Repository,
    manifest: Manifest,
    instance: DrillInstance,
    target: RecoveryTarget,
    config_file: str,
) -> RestoreStep:
    """Physical: verify + unpack, pg_verifybackup, make it safe to start, write recovery settings.
    Logical: initdb + start a fresh server, create the database, pg_restore."""
    t0 = time.monotonic()
    if manifest.kind == "physical":
        res = rsteps.restore_physical(
            cfg,
            repo,
            manifest,
            instance.pgdata,
            rsteps.relocate_tablespaces(manifest, Path(instance.workdir)),
        )
        seconds = time.monotonic() - t0
        logger().info("verified and unpacked %s in %.1fs", human_bytes(res.raw_bytes), seconds)
        check = integrity.verify_backup_dir(
            instance.pgdata, bindir=cfg.postgres.bindir, os_user=cfg.postgres.os_user
        )
        logger().info("pg_verifybackup: %s (%s)", check.status, check.summary)
        dsteps.configure_instance(instance)
        write_recovery_settings(
            instance.pgdata, config_path=config_file, target=target, os_user=cfg.postgres.os_user
        )
        logger().info(
            "recovery settings written: replay to %s, then promote; archiving off", target.describe()
        )
        restored = CheckResult(
            name="restore",
            kind="restore",
            category="restore",
            status="passed",
            seconds=seconds,
            summary=f"{human_bytes(res.raw_bytes)} verified and unpacked",
        )
        return RestoreStep(seconds=seconds, raw_bytes=res.raw_bytes, checks=[restored, check])
    dsteps.create_empty_instance(instance)
    t1 = time.monotonic()
    if manifest.databases and manifest.globals_object:
        # a whole-cluster logical backup: roles, tablespaces (moved under the instance's
        # directory) and every database, as a real restore would bring them back
        cres = rsteps.restore_cluster(
            cfg,
            repo,
            manifest,
            instance.dsn("postgres"),
            jobs=2,
            tablespace_map=rsteps.relocate_tablespaces(manifest, Path(instance.workdir)),
        )
        seconds = time.monotonic() - t1
        logger().info(
            "restored globals and %d database(s) of %s in %.1fs (server set up in %.1fs)",
            len(cres.databases),
            manifest.id,
            seconds,
            t1 - t0,
        )
        for line in cres.skipped:
            logger().warning("not in the backup: %s", line)
        restored = CheckResult(
            name="restore",
            kind="restore",
            category="restore",
            status="passed",
            seconds=seconds,
            summary=f"globals and {len(cres.databases)} database(s) into a fresh instance",
        )
        skipped = {
            d.name: [f"not in this backup, not restored or checked: {d.skipped}"]
            for d in manifest.databases
            if d.skipped
        }
        return RestoreStep(seconds=seconds, raw_bytes=cres.raw_bytes, checks=[restored], notes=skipped)
    database = manifest.database or "postgres"
    if database != "postgres":
        from tasks.sample import create_database

        create_database(instance.dsn("postgres"), database)
    # roles are not part of a single-database dump: a throwaway instance has none of production's
    # owners; what needs them is skipped and said (see dsteps.logical_scope_notes)
    res = rsteps.restore_logical(
        cfg, repo, manifest, instance.dsn(database), jobs=2, no_owner=True, skip_missing_roles=True
    )
    seconds = time.monotonic() - t1
    logger().info(
        "pg_restore of %s into database %s took %.1fs (server set up in %.1fs)",
        manifest.id,
        database,
        seconds,
        t1 - t0,
    )
    notes = dsteps.logical_scope_notes(database, manifest.cluster_databases, list(res.skipped))
    for db, items in notes.items():
        for item in items:
            logger().warning("not restored/checked in %s: %s", db, item)
    summary = f"pg_restore into an empty database {database}"
    if res.skipped:
        summary += f"; {len(res.skipped)} statement(s) skipped for lack of the source's roles (see Databases)"
    restored = CheckResult(
        name="restore", kind="restore", category="restore", status="passed", seconds=seconds, summary=summary
    )
    return RestoreStep(seconds=seconds, raw_bytes=res.raw_bytes, checks=[restored], notes=notes)


@task(name="start-and-wait", cache_policy=NO_CACHE)
def start_and_wait(
    cfg: Config,
    repo: Repository,
    manifest: Manifest,
    instance: DrillInstance,
    target: RecoveryTarget,
    config_file: str,
) -> RecoveryStep:
    """Start the restored server and wait for recovery to reach its target and promote.

    When the manifest has row counts, recovery first pauses where they apply — at the LSN the
    backup read them at (exact), or else at the backup's consistent point (within the documented
    tolerance) — where they are compared read-only as the instance's own superuser; then the
    server is restarted towards the target. That pause and restart are not part of the measured
    recovery time."""
    t0 = time.monotonic()
    if manifest.kind == "logical":
        check = CheckResult(
            name="recovery",
            kind="recovery",
            category="restore",
            status="skipped",
            summary="logical backup: no WAL replay",
        )
        point = dsteps.plan_count_point(
            kind="logical",
            has_counts=bool(manifest.row_counts),
            counts_lsn=None,
            target_kind=target.kind,
            target_lsn_at_or_after=False,
            lsn_reachable=False,
            may_pass_backup=False,
        )
        return RecoveryStep(
            seconds=0.0,
            recovered_to=manifest.start_time,
            lsn=manifest.start_lsn,
            timeline=None,
            past_backup=False,
            check=check,
            instance=instance,
            point=point,
        )
    timeout = cfg.drill.recovery_timeout_seconds
    cluster = instance.cluster()
    if dsteps.run_before_start_hook_for_tests(instance):
        logger().warning("a test hook ran on the restored data directory before it started")
    count_checks: list[CheckResult] | None = None
    excluded = 0.0
    note = ""
    point = _count_point(cfg, repo, manifest, target)
    logger().info(
        "row counts: compared %s (%s)%s",
        point.describe(manifest.row_counts_lsn),
        point.mode,
        f"; {point.reason}" if point.reason else "",
    )
    if point.where in ("lsn", "consistent"):
        pause = (
            RecoveryTarget(kind="lsn", value=manifest.row_counts_lsn)
            if point.where == "lsn"
            else RecoveryTarget(kind="immediate")
        )
        # the counts saw exactly the commits before their LSN: replay what lies before it, no more
        write_recovery_settings(
            instance.pgdata,
            config_path=config_file,
            target=pause,
            os_user=cfg.postgres.os_user,
            action="pause",
            inclusive=False,
        )
        _start(cfg, instance, timeout)
        paused_at = wait_for_pause(cluster, pause, timeout=timeout)
        t_pause = time.monotonic()
        instance = dsteps.resolve_superuser(instance)
        count_checks = counts_at_pause(cfg, manifest, instance, paused_at, point)
        failed = sum(1 for c in count_checks if c.failed)
        logger().info("row counts at %s: %d compared, %d failed", paused_at, len(count_checks), failed)
        cluster.stop("fast", timeout=int(timeout))
        dsteps.set_aside_pause_log(cluster.logfile)
        write_recovery_settings(
            instance.pgdata, config_path=config_file, target=target, os_user=cfg.postgres.os_user
        )
        excluded = time.monotonic() - t_pause
        note = (
            f"; paused {point.describe(manifest.row_counts_lsn)} (replayed up to {paused_at}) to compare "
            f"row counts ({excluded:.1f} s, not counted)"
        )
    t_start = time.monotonic()
    _start(cfg, instance, timeout)
    outcome: RecoveryOutcome = wait_for_recovery(cluster, target, timeout=timeout)
    instance = dsteps.resolve_superuser(instance)
    seconds = time.monotonic() - t0 - excluded
    past = past_backup(manifest, outcome.reached_lsn)
    recovered_at = recovered_to(manifest, target, outcome, past)
    summary = (
        f"promoted on timeline {outcome.timeline} at {outcome.reached_lsn or '?'} after replaying to "
        f"{target.describe()}" + (" (WAL from the archive)" if past else " (backup's own WAL)")
    )
    if outcome.stop_message:
        summary += f"; {outcome.stop_message}"
    summary += note
    logger().info("recovery: %s in %.1fs (last start %.1fs)", summary, seconds, time.monotonic() - t_start)
    check = CheckResult(
        name="recovery",
        kind="recovery",
        category="restore",
        status="passed",
        seconds=seconds,
        summary=summary,
    )
    return RecoveryStep(
        seconds=seconds,
        recovered_to=recovered_at,
        lsn=outcome.reached_lsn,
        timeline=outcome.timeline,
        past_backup=past,
        check=check,
        count_checks=count_checks,
        counts_seconds=excluded,
        instance=instance,
        point=point,
    )


def _count_point(
    cfg: Config, repo: Repository, manifest: Manifest, target: RecoveryTarget
) -> dsteps.CountPoint:
    """Where the manifest's counts can be compared on this restore (the decision is pure, in
    tasks.drill.plan_count_point; this looks up what it needs in the repository)."""
    lsn = manifest.row_counts_lsn
    wanted, at_or_after = counts_lsn_in_reach(manifest, target)
    reachable = wanted and lsn is not None and _wal_reachable(cfg, repo, manifest, lsn)
    may_pass = (
        bool(manifest.row_counts) and not reachable and replay_may_pass_backup(cfg, repo, manifest, target)
    )
    return dsteps.plan_count_point(
        kind=manifest.kind,
        has_counts=bool(manifest.row_counts),
        counts_lsn=lsn,
        target_kind=target.kind,
        target_lsn_at_or_after=at_or_after,
        lsn_reachable=reachable,
        may_pass_backup=may_pass,
    )


def _wal_reachable(cfg: Config, repo: Repository, manifest: Manifest, lsn: str) -> bool:
    """Is the WAL segment holding ``lsn`` in the backup itself or in the archive?"""
    try:
        name = segment_to_find(manifest, lsn)
        if name is None:
            return True
        return find_object(repo, name, WalSettings.from_config(cfg.repository)) is not None
    except DRError as exc:
        logger().warning("could not look for the WAL of the row counts (%s)", one_line(exc))
        return False


def replay_may_pass_backup(cfg: Config, repo: Repository, manifest: Manifest, target: RecoveryTarget) -> bool:
    """Can recovery go on past the backup's consistent point? Always towards a target (it lies
    past the backup); towards the end of the archive when the archive holds the segment after
    the backup's last one or the next timeline's history. In doubt, yes."""
    known = may_pass_backup_by_target(manifest, target)
    if known is not None:
        return known
    try:
        settings = WalSettings.from_config(cfg.repository)
        return any(find_object(repo, name, settings) is not None for name in names_past_backup(manifest))
    except DRError as exc:
        logger().warning("could not look for WAL past the backup (%s): assuming there is some", one_line(exc))
        return True


def _start(cfg: Config, instance: DrillInstance, timeout: float) -> None:
    try:
        dsteps.start_instance(instance, timeout=timeout, env=repository_env(cfg))
    except DRError as exc:
        raise PreconditionFailed(f"restored server did not start: {one_line(exc)}") from None


def counts_at_pause(
    cfg: Config, manifest: Manifest, instance: DrillInstance, lsn: str, point: dsteps.CountPoint
) -> list[CheckResult]:
    """The manifest's row counts and newest timestamps against the copy paused where they apply
    (read-only; unlogged tables cannot be read during recovery: they are checked after promotion)."""
    seen: dict[str, list[int] | None] = {}
    if point.mode == "exact":
        for snapshot in manifest.row_counts_snapshots.values():
            if snapshot not in seen:
                seen[snapshot] = dsteps.inflight_commits(instance, snapshot)
    inflight = {db: seen[snap] for db, snap in manifest.row_counts_snapshots.items() if snap in seen}
    mode, where, per_db = dsteps.count_modes_at_pause(point, lsn, inflight)
    return _recorded_fact_checks(cfg, manifest, instance, mode, where, skip_unlogged=True, per_db=per_db)


def _recorded_fact_checks(
    cfg: Config,
    manifest: Manifest,
    instance: DrillInstance,
    mode: Literal["exact", "tolerance"],
    where: str,
    *,
    skip_unlogged: bool,
    per_db: dict[str, tuple[Literal["exact", "tolerance"], str]] | None = None,
) -> list[CheckResult]:
    databases = set(dsteps.list_restored_databases(instance))
    specs: list[gxsteps.ExpectationSpec] = []
    results = gxsteps.missing_databases(manifest.row_counts, databases)
    for db, expected in sorted(manifest.row_counts.items()):
        if db not in databases:
            continue
        skip = manifest.unlogged_tables.get(db, []) if skip_unlogged else []
        db_mode, db_where = (per_db or {}).get(db, (mode, where))
        db_specs, decided = gxsteps.plan_recorded_facts(
            db,
            gxsteps.read_catalog(instance.dsn(db)),
            counts=expected,
            newest=manifest.newest_timestamps.get(db, {}),
            skip_tables=set(skip),
            count_mode=db_mode,
            tolerance=cfg.drill.row_count_tolerance,
            max_age_seconds=cfg.drill.freshness_max_seconds,
            at=db_where,
        )
        specs += db_specs
        results += decided
    for db, tables in sorted(manifest.not_counted.items()):
        for table, reason in sorted(tables.items()):
            name = f"row-count {db}" if table == "*" else f"row-count {db}.{table}"
            results.append(
                CheckResult(
                    name=name,
                    kind="row-count",
                    category="data",
                    status="skipped",
                    database=db,
                    summary=f"not recorded at backup: {reason}",
                )
            )
    return results + gxsteps.run_expectations(gxsteps.unique_names(specs), instance.dsn)


@task(name="checks", cache_policy=NO_CACHE)
def run_checks(
    cfg: Config,
    manifest: Manifest,
    instance: DrillInstance,
    suites: list[gxsteps.SuiteFile],
    recovery: RecoveryStep,
    started_at: datetime,
) -> list[CheckResult]:
    """amcheck on every database, then the default suite and the user suites with GX."""
    if dsteps.run_before_checks_hook_for_tests(instance):
        logger().warning("a test hook ran on the instance before its checks")
    results: list[CheckResult] = []
    databases = dsteps.list_restored_databases(instance)

    def amcheck_all() -> list[CheckResult]:
        return [
            integrity.amcheck_database(
                instance.dsn(db),
                db,
                jobs=cfg.drill.amcheck_jobs,
                heapallindexed_max_mb=cfg.drill.heapallindexed_max_mb,
            )
            for db in databases
        ]

    # amcheck works in server processes and the expectations in others: overlapping them keeps
    # the checks close to the cost of the larger of the two instead of their sum.
    amcheck_pool = ThreadPoolExecutor(1, thread_name_prefix="amcheck-all")
    amcheck_future = amcheck_pool.submit(amcheck_all)
    try:
        data = _run_data_checks(cfg, manifest, instance, suites, recovery, databases, results, started_at)
    finally:
        amcheck_results = amcheck_future.result()
        amcheck_pool.shutdown()
    for check in amcheck_results:
        logger().info("%s: %s (%s)", check.name, check.status, check.summary)
    return amcheck_results + results + data


def _run_data_checks(
    cfg: Config,
    manifest: Manifest,
    instance: DrillInstance,
    suites: list[gxsteps.SuiteFile],
    recovery: RecoveryStep,
    databases: list[str],
    results: list[CheckResult],
    started_at: datetime,
) -> list[CheckResult]:
    """The default suite and the user suites through GX; checks decided without a query are
    appended to ``results``."""
    catalogs = {db: gxsteps.read_catalog(instance.dsn(db)) for db in databases}
    reference = recovery.recovered_to or manifest.stop_time
    point = recovery.point
    specs: list[gxsteps.ExpectationSpec] = []
    data: list[CheckResult] = []
    if recovery.count_checks is not None:
        results += recovery.count_checks  # compared while recovery was paused
    elif point.where == "promoted" and not (manifest.kind == "physical" and recovery.past_backup):
        mode: Literal["exact", "tolerance"] = "exact" if point.mode == "exact" else "tolerance"
        where = "in the restored dump" if manifest.kind == "logical" else "on the promoted copy"
        if point.reason:
            where += f" ({point.reason})"
        data += _recorded_fact_checks(
            cfg, manifest, instance, mode, where, skip_unlogged=manifest.kind == "physical"
        )
    elif manifest.row_counts:
        results.append(
            CheckResult(
                name="row-count",
                kind="row-count",
                category="data",
                status="skipped",
                summary="WAL from the archive was replayed past the backup: counts recorded at backup time do not "
                "apply" + (f" ({point.reason})" if point.reason else ""),
            )
        )
    recorded_newest = manifest.row_counts_lsn is not None or bool(manifest.newest_timestamps)
    for db in databases:
        if manifest.kind == "physical" and manifest.unlogged_tables.get(db):
            specs += gxsteps.plan_unlogged(
                db, catalogs[db], manifest.unlogged_tables[db], manifest.row_counts.get(db, {})
            )
        note: str | None = None
        if recorded_newest:
            note = (
                ""
                if db in manifest.row_counts
                else "the backup recorded no newest timestamps here, and the age of the data is not "
                "judged against the wall clock"
            )
        db_specs, decided = gxsteps.plan_default(
            db,
            catalogs[db],
            expected_counts=None,
            count_mode="skip",
            tolerance=cfg.drill.row_count_tolerance,
            reference=reference,
            max_age_seconds=cfg.drill.freshness_max_seconds,
            freshness_columns=cfg.drill.freshness_columns,
            freshness_note=note,
        )
        specs += db_specs
        results += decided
    for suite in suites:
        suite_specs, decided = gxsteps.plan_suite(suite, catalogs, now=started_at, reference=reference)
        specs += suite_specs
        results += decided
    t0 = time.monotonic()
    data += gxsteps.run_expectations(gxsteps.unique_names(specs), instance.dsn)
    failed = [c for c in data if c.failed]
    logger().info(
        "%d expectation(s) on %d database(s) in %.1fs: %d failed%s",
        len(data),
        len(databases),
        time.monotonic() - t0,
        len(failed),
        "" if not failed else ": " + ", ".join(c.name for c in failed[:10]),
    )
    return data


@task(name="open-databases", cache_policy=NO_CACHE)
def open_databases(instance: DrillInstance) -> dict[str, str]:
    """Databases that refused connections on the source (datallowconn = false) are opened on the
    throwaway instance, so that they are checked too; database -> note for the report."""
    notes = dsteps.open_all_databases(instance)
    for db, note in notes.items():
        logger().info("database %s: %s", db, note)
    return notes


@task(name="usability", cache_policy=NO_CACHE)
def usability(manifest: Manifest, instance: DrillInstance) -> CheckResult:
    databases = dsteps.list_restored_databases(instance)
    database = manifest.database if manifest.database in databases else "postgres"
    check = dsteps.check_usability(instance, database)
    logger().info("%s: %s (%s)", check.name, check.status, check.summary)
    return check


@task(name="verify-data-checksums", cache_policy=NO_CACHE)
def verify_data_checksums(cfg: Config, manifest: Manifest, instance: DrillInstance) -> CheckResult:
    """pg_checksums --check needs a cleanly stopped cluster: stop it first."""
    if manifest.kind != "physical":
        return CheckResult(
            name="pg_checksums",
            kind="pg_checksums",
            category="integrity",
            status="skipped",
            summary="logical backup: block checksums are not carried over",
        )
    if manifest.data_checksums:
        instance.cluster().stop(mode="fast", timeout=600)
    check = integrity.checksums_check(
        instance.pgdata,
        enabled_in_source=manifest.data_checksums,
        bindir=cfg.postgres.bindir,
        os_user=cfg.postgres.os_user,
    )
    logger().info("pg_checksums: %s (%s)", check.status, check.summary)
    return check


@task(name="teardown", cache_policy=NO_CACHE)
def teardown(instance: DrillInstance) -> None:
    gone = dsteps.teardown_instance(instance)
    if all(gone.values()):
        logger().info("instance torn down: server stopped, %s removed", instance.workdir)
    else:
        logger().error("teardown incomplete: %s", gone)


@task(name="report", cache_policy=NO_CACHE, **NETWORK_RETRIES)
def upload_report(repo: Repository, report: DrillReport) -> list[str]:
    keys = dsteps.store_report(repo, report)
    logger().info("report stored as %s and %s", *keys)
    return keys


@task(name="metrics", cache_policy=NO_CACHE)
def push_drill_metrics(cfg: Config, report: DrillReport, kind: str) -> None:
    """Grouped by cluster and the kind of backup drilled: a logical drill's success must not
    hide a failed physical one."""
    now = time.time()
    values: dict[str, float] = {
        "gravl_drill_success": 1.0 if report.passed else 0.0,
        "gravl_drill_last_run_timestamp_seconds": now,
        "gravl_drill_duration_seconds": report.total_seconds,
        "gravl_drill_failed_checks": float(len(report.failed_checks)),
    }
    if report.rto_seconds is not None:
        values["gravl_drill_rto_seconds"] = report.rto_seconds
    if report.rpo_seconds is not None:
        values["gravl_drill_rpo_seconds"] = report.rpo_seconds
    if report.passed:
        values["gravl_drill_last_success_timestamp_seconds"] = now
    push_flow_metrics(cfg, "drill", values, kind=report.backup_kind or kind)


def suites_dir(cfg: Config, config_file: str | None) -> Path | None:
    """drill.suites_dir, relative to the config file's directory."""
    if not cfg.drill.suites_dir:
        return None
    path = Path(cfg.drill.suites_dir)
    if not path.is_absolute():
        path = config_path(config_file).absolute().parent / path
    return path


def _cleanup_hook(flow: Any, flow_run: Any, state: Any) -> None:
    """On cancellation or crash: tear down whatever this flow run still owns."""
    from tasks.config import load_config

    try:
        cfg = load_config((flow_run.parameters or {}).get("config_path"))
        removed = dsteps.teardown_for_flow_run(dsteps.work_base(cfg), str(flow_run.id), cfg.postgres.bindir)
    except Exception:  # noqa: BLE001 - a hook must not raise; the next drill sweeps leftovers
        return
    if removed:
        import logging

        logging.getLogger(__name__).warning("tore down %d drill instance(s) of run %s", removed, flow_run.id)


# ---------------------------------------------------------------- the flow


@flow(name="drill", on_cancellation=[_cleanup_hook], on_crashed=[_cleanup_hook], on_running=[send_heartbeat])
def drill_flow(
    config_path: ConfigPath = None,
    backup: BackupRef = "latest",
    target_time: OptionalTime = None,
    kind: BackupKind = "physical",
) -> DrillReport:
    """Restore a backup into a throwaway instance, check it thoroughly, report, tear down.

    Args:
        config_path: The gravl-dr config file; empty: $GRAVL_DR_CONFIG of the worker, then
            gravl-dr.yaml in its working directory.
        backup: The backup to drill: an id as `gravl-dr list` prints it, or latest (the newest
            backup of the chosen kind).
        target_time: Recover to this point in time instead of the end of the WAL archive
            (physical backups only; without a time zone it is UTC).
        kind: Which kind of backup latest means: physical (restore, WAL replay, page checksums)
            or logical (the dump restored into a fresh server).
    """
    started_at = datetime.now(UTC)
    t0 = time.monotonic()
    cfg, repo = load(config_path)
    config_file = str(_config_file(config_path))
    if target_time is not None and target_time.tzinfo is None:
        target_time = target_time.replace(tzinfo=UTC)
    target = RecoveryTarget(kind="time", value=target_time.isoformat()) if target_time else RecoveryTarget()
    drill_id = dsteps.new_drill_id(started_at)
    report = DrillReport(
        drill_id=drill_id, cluster=cfg.cluster, started_at=started_at, target=target.describe()
    )
    suites = validate_suites(cfg, config_path)
    instance: DrillInstance | None = None
    try:
        manifest, report.selection = pick_backup(repo, backup, cfg.cluster, target_time, kind)
        report.backup_id, report.backup_kind = manifest.id, manifest.kind
        report.backup_stop_time = manifest.stop_time
        if manifest.kind == "logical":
            report.target = f"the dump's snapshot ({manifest.start_time.isoformat()})"
        instance = provision_instance(cfg, drill_id, manifest.kind)
        _run_steps(cfg, repo, manifest, instance, suites, target, config_file, report)
    except Exception as exc:  # noqa: BLE001 - the report says what went wrong; teardown still runs
        report.error = one_line(exc) if isinstance(exc, DRError) else f"{type(exc).__name__}: {one_line(exc)}"
        logger().error("drill stopped: %s", report.error)
    finally:
        if instance is not None:
            teardown(instance)
    report.finished_at = datetime.now(UTC)
    report.total_seconds = time.monotonic() - t0
    report.passed = report.error is None and bool(report.checks) and not report.failed_checks
    report.report_keys = dsteps.report_keys(drill_id)
    try:
        upload_report(repo, report)
    except DRError as exc:
        logger().error("report not stored in the repository: %s", one_line(exc))
        report.passed = False
        report.error = report.error or f"report not stored: {one_line(exc)}"
    publish_report(report_key("drill", cfg.cluster), dsteps.render_markdown(report), report.verdict())
    push_drill_metrics(cfg, report, kind)
    if not report.passed:
        raise DrillFailed(report)
    logger().info(
        "%s; RTO %.1fs, RPO %s",
        report.verdict(),
        report.rto_seconds or 0.0,
        f"{report.rpo_seconds:.0f}s" if report.rpo_seconds is not None else "-",
    )
    return report


def _run_steps(
    cfg: Config,
    repo: Repository,
    manifest: Manifest,
    instance: DrillInstance,
    suites: list[gxsteps.SuiteFile],
    target: RecoveryTarget,
    config_file: str,
    report: DrillReport,
) -> None:
    """restore -> start-and-wait -> checks -> usability -> checksums; a failed step is a failed check."""
    try:
        restored = restore(cfg, repo, manifest, instance, target, config_file)
    except Exception as exc:  # noqa: BLE001 - a failed step is a failed check
        report.checks.append(integrity.failed_check("restore", "restore", "restore", exc))
        return
    report.checks += restored.checks
    report.restore_seconds = restored.seconds
    try:
        recovery = start_and_wait(cfg, repo, manifest, instance, target, config_file)
    except Exception as exc:  # noqa: BLE001 - a failed step is a failed check
        report.checks.append(integrity.failed_check("recovery", "recovery", "restore", exc))
        return
    report.checks.append(recovery.check)
    report.recovery_seconds = recovery.seconds
    report.rto_seconds = restored.seconds + recovery.seconds
    report.recovered_to, report.recovered_lsn, report.timeline = (
        recovery.recovered_to,
        recovery.lsn,
        recovery.timeline,
    )
    report.rpo_seconds = dsteps.data_age(report.started_at, recovery.recovered_to)
    instance = recovery.instance  # as the instance's own superuser from here on
    notes = {db: list(items) for db, items in restored.notes.items()}
    t_checks = time.monotonic()
    try:
        for db, note in open_databases(instance).items():
            notes.setdefault(db, []).append(note)
        report.checks += run_checks(cfg, manifest, instance, suites, recovery, report.started_at)
        report.checks.append(usability(manifest, instance))
        report.checks.append(verify_data_checksums(cfg, manifest, instance))
    finally:
        # with the row counts compared while recovery paused where they apply
        report.checks_seconds = time.monotonic() - t_checks + recovery.counts_seconds
        report.databases = dsteps.coverage(report.checks, sorted(manifest.row_counts), notes)


def _config_file(explicit: str | None) -> Path:
    return config_path(explicit).absolute()


def run_drill(
    config_path: str | None,
    backup: str = "latest",
    target_time: datetime | None = None,
    kind: BackupKind = "physical",
) -> DrillReport:
    """Run the drill flow and return its report, passed or failed (for the demo and scripts)."""
    try:
        return drill_flow(config_path=config_path, backup=backup, target_time=target_time, kind=kind)
    except DrillFailed as exc:
        return exc.report
