"""Orchestration: the ``wal-check`` flow — is every WAL file the server produced safely archived?

PostgreSQL pushes WAL itself (``archive_command = 'gravl-dr wal-push %p'``); this flow is the
operator's view of it: continuity of the archive from the oldest kept backup to the newest
segment on every timeline, the archiver's health (``pg_stat_archiver``, and the file it last
reported archived really is in the repository, intact), and the archive lag in bytes and
seconds — the RPO exposure right now. One name everywhere: flow, CLI command (``gravl-dr
wal-check``) and metrics job ``wal-check``, artifact ``wal-check-report-<cluster>``.

Deployed every 10 minutes (``wal-check-10min``) with ``watch_minutes``: between two full checks
the run keeps measuring the lag once a minute from ``pg_stat_archiver`` (one query, no repository
listing) and pushes it, so the RPO gauge stays fresh without 1440 flow runs a day. With
``archive_timeout = 60s`` on the server (recommended), an idle-after-burst server has its last
write archived within about a minute (tests/test_pitr.py measures it with a short timeout).
"""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime, timedelta
from typing import Annotated

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from pydantic import Field

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
from flows.params import ConfigPath
from tasks import walcheck
from tasks.config import Config
from tasks.errors import DRError, one_line
from tasks.metrics import push_metrics
from tasks.postgres import PrimaryStatus, safe_dsn
from tasks.postgres import observe_primary as pg_observe_primary
from tasks.reporting import bullets, document, kv_table, report_key, section, table
from tasks.repository import Repository
from tasks.walarchive import list_archive
from tasks.walformat import WalSettings

JOB = "wal-check"  # the flow's name: the Pushgateway job of its metrics


@task(name="check-archive-continuity", cache_policy=NO_CACHE, **NETWORK_RETRIES)
def check_archive_continuity(cfg: Config, repo: Repository) -> walcheck.WalCheckReport:
    report = walcheck.check_wal(cfg, repo, server=False)
    for span in report.timelines:
        logger().info(
            "timeline %d: %d segment(s) %s..%s",
            span.timeline,
            span.segments,
            span.first or "-",
            span.last or "-",
        )
    if report.gaps:
        for gap in report.gaps:
            logger().error("gap in the archive: %s", gap.describe())
    else:
        logger().info(
            "archive continuous from %s (oldest kept backup %s) to %s",
            report.start_wal or "its oldest segment",
            report.oldest_backup or "-",
            report.newest_segment or "-",
        )
    return report


@task(name="check-archiver-health", cache_policy=NO_CACHE, **NETWORK_RETRIES)
def check_archiver_health(
    cfg: Config, repo: Repository, report: walcheck.WalCheckReport
) -> walcheck.WalCheckReport:
    status = walcheck.read_archiver(cfg.primary.dsn)
    archive = list_archive(repo)
    settings = WalSettings.from_config(cfg.repository)
    checked = report.model_copy(deep=True)
    checked.archiver = status
    walcheck.judge_archiver(checked, status, repo, settings, archive, datetime.now(UTC))
    if status.reachable:
        logger().info(
            "archiver: %d archived, %d failed; last archived %s at %s%s; lag %s, %.0f s",
            status.archived_count,
            status.failed_count,
            status.last_archived_wal or "-",
            status.last_archived_time,
            " (verified in the repository)" if checked.last_archived_verified else "",
            human_bytes(checked.lag_bytes or 0),
            checked.lag_seconds or 0,
        )
    for problem in checked.problems[len(report.problems) :]:
        logger().error(problem)
    return checked


@task(name="observe-primary", cache_policy=NO_CACHE)
def observe_primary(cfg: Config) -> PrimaryStatus:
    status = pg_observe_primary(cfg.primary.dsn)
    if not status.up:
        logger().error("primary %s is not reachable: %s", safe_dsn(cfg.primary.dsn), status.error)
    elif status.in_recovery:
        logger().warning("the configured primary %s is in recovery (a standby)", safe_dsn(cfg.primary.dsn))
    for r in status.replicas:
        if r.replay_lag_bytes is None:
            logger().warning(
                "replica %s: %s, replay position not reported yet (lag unknown)", r.name, r.state
            )
        else:
            logger().info("replica %s: %s, replay lag %s", r.name, r.state, human_bytes(r.replay_lag_bytes))
    return status


def _push_replication(cfg: Config, status: PrimaryStatus | None) -> None:
    if status is None:
        return
    push_metrics(
        cfg.metrics.pushgateway,
        JOB,
        {"cluster": cfg.cluster},
        {"gravl_primary_up": 1.0 if status.up and not status.in_recovery else 0.0},
    )
    for r in status.replicas:
        push_metrics(
            cfg.metrics.pushgateway,
            JOB,
            {"cluster": cfg.cluster, "replica": r.name},
            # unknown is NaN (no alert fires on it, no graph shows 0), never a stale or a 0 value
            {
                "gravl_replication_lag_bytes": math.nan
                if r.replay_lag_bytes is None
                else float(r.replay_lag_bytes)
            },
        )


@task(name="push-wal-metrics", cache_policy=NO_CACHE)
def push_wal_metrics(
    cfg: Config, report: walcheck.WalCheckReport | None, failed: bool, status: PrimaryStatus | None = None
) -> None:
    now = time.time()
    try:
        _push_replication(cfg, status)
    except DRError as exc:
        logger().warning("replication metrics not pushed: %s", one_line(exc))
    values: dict[str, float] = {}
    if report is not None:
        a = report.archiver
        values.update(
            {
                "gravl_wal_archive_gaps": float(len(report.gaps)),
                "gravl_wal_archive_problems": float(len(report.problems)),
                "gravl_wal_archived_files": float(report.archived_files),
            }
        )
        if report.lag_bytes is not None:
            values["gravl_wal_archive_lag_bytes"] = float(report.lag_bytes)
        if report.lag_seconds is not None:
            values["gravl_wal_archive_lag_seconds"] = report.lag_seconds
        if a is not None and a.reachable:
            values["gravl_wal_archiver_failed_count"] = float(a.failed_count)
            values["gravl_wal_archiver_archived_count"] = float(a.archived_count)
            if a.last_archived_time is not None:
                values["gravl_wal_last_archived_timestamp_seconds"] = a.last_archived_time.timestamp()
            if a.ready_count is not None:
                values["gravl_wal_ready_files"] = float(a.ready_count)
    if failed or report is None or not report.ok:
        values["gravl_wal_check_last_failure_timestamp_seconds"] = now
    else:
        values["gravl_wal_check_last_success_timestamp_seconds"] = now
    push_flow_metrics(cfg, JOB, values)


def _markdown(report: walcheck.WalCheckReport, error: str | None = None) -> str:
    status = "OK" if report.ok and not error else "PROBLEMS"
    rows: list[tuple[str, object]] = [
        ("repository", report.repository),
        ("oldest kept backup", f"{report.oldest_backup or '-'} (start {report.start_wal or '-'})"),
        ("newest archived segment", report.newest_segment or "-"),
        ("archived files", report.archived_files),
    ]
    if report.lag_bytes is not None:
        rows.append(("archive lag", f"{human_bytes(report.lag_bytes)}, {report.lag_seconds or 0:.0f} s"))
    a = report.archiver
    if a is not None and a.reachable:
        verified = " (verified)" if report.last_archived_verified else ""
        timeout = a.archive_timeout_s if a.archive_timeout_s is not None else "-"
        rows += [
            ("archiver", f"{a.archived_count} archived, {a.failed_count} failed"),
            ("last archived", f"{a.last_archived_wal or '-'} at {a.last_archived_time or '-'}{verified}"),
            ("last failure", f"{a.last_failed_wal or '-'} at {a.last_failed_time or '-'}"),
            ("archive_timeout", f"{timeout} s"),
        ]
    timelines = [(s.timeline, s.segments, s.first or "-", s.last or "-") for s in report.timelines]
    lines = [f"# WAL archive of {report.cluster}: {status}", "", *kv_table(rows)]
    lines += section("Timelines", ["", *table(("timeline", "segments", "first", "last"), timelines)])
    if report.gaps:
        lines += [
            "",
            "## Gaps",
            *bullets(g.describe() for g in report.gaps),
            "",
            "Recovery cannot pass a gap: take a new backup now (it starts a new continuous "
            "range), then find out why the files are missing.",
        ]
    if report.warnings:
        lines += section("Warnings", bullets(report.warnings))
    if report.problems or error:
        lines += section("Problems", bullets(report.problems))
        if error:
            lines.append(f"- `{error}`")
        lines += ["", "Check the server log for archive_command errors and `gravl-dr wal-check`."]
    return document(lines)


@task(name="watch-archive-lag", cache_policy=NO_CACHE)
def watch_archive_lag(cfg: Config, minutes: int, every_seconds: int) -> list[walcheck.LagSample]:
    """Sample the server's archive lag every ``every_seconds`` for ``minutes``, pushing each sample."""
    log = logger()
    deadline = time.monotonic() + minutes * 60
    until = datetime.now(UTC) + timedelta(minutes=minutes)
    expected = max(1, (minutes * 60) // every_seconds)
    log.info(
        "watching the archive lag every %d s until %s (%d sample(s))",
        every_seconds,
        until.strftime("%H:%M:%S UTC"),
        expected,
    )
    samples: list[walcheck.LagSample] = []
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(every_seconds, left))
        sample = walcheck.server_lag(walcheck.read_archiver(cfg.primary.dsn), datetime.now(UTC))
        samples.append(sample)
        if not sample.reachable:
            log.warning(
                "lag sample %d/%d: primary unreachable (%s); watching until %s",
                len(samples),
                expected,
                sample.error,
                until.strftime("%H:%M:%S UTC"),
            )
        else:
            log.info(
                "lag sample %d/%d: %s, %s behind (last archived %s); watching until %s",
                len(samples),
                expected,
                human_bytes(sample.lag_bytes) if sample.lag_bytes is not None else "unknown",
                f"{sample.lag_seconds:.0f} s" if sample.lag_seconds is not None else "unknown",
                sample.last_archived_wal or "-",
                until.strftime("%H:%M:%S UTC"),
            )
        values: dict[str, float] = {
            "gravl_wal_lag_sample_timestamp_seconds": sample.at.timestamp(),
        }
        if sample.lag_bytes is not None:
            values["gravl_wal_archive_lag_bytes"] = float(sample.lag_bytes)
        if sample.lag_seconds is not None:
            values["gravl_wal_archive_lag_seconds"] = sample.lag_seconds
        try:
            push_metrics(cfg.metrics.pushgateway, JOB, {"cluster": cfg.cluster}, values)
        except DRError as exc:
            log.warning("lag sample not pushed: %s", one_line(exc))
    return samples


@flow(name="wal-check", on_running=[send_heartbeat])
def wal_check_flow(
    config_path: ConfigPath = None,
    check_server: bool = True,
    watch_minutes: Annotated[int, Field(ge=0, le=60)] = 0,
    sample_every_seconds: Annotated[int, Field(ge=10, le=600)] = 60,
) -> walcheck.WalCheckReport:
    """WAL archive check: continuity, archiver health and archive lag, with metrics and a report.

    Args:
        config_path: The gravl-dr config file; empty: $GRAVL_DR_CONFIG of the worker, then
            gravl-dr.yaml in its working directory.
        check_server: Also ask the primary (pg_stat_archiver): archiver failures and the archive
            lag. Off: check the repository's continuity only.
        watch_minutes: After the check, keep measuring the archive lag for this many minutes
            (0: do not watch). The 10-minute deployment watches 9 minutes between checks.
        sample_every_seconds: How often the watch measures and pushes the archive lag.
    """
    cfg, repo = load(config_path)
    artifact_key = report_key(JOB, cfg.cluster)
    cfg = follow_primary(cfg, repo, JOB, artifact_key)
    report: walcheck.WalCheckReport | None = None
    status = observe_primary(cfg) if check_server else None
    try:
        report = check_archive_continuity(cfg, repo)
        if check_server:
            report = check_archiver_health(cfg, repo, report)
    except BaseException as exc:
        if report is not None:
            publish_report(artifact_key, _markdown(report, one_line(exc)))
        push_wal_metrics(cfg, report, failed=True, status=status)
        raise
    publish_report(artifact_key, _markdown(report), f"WAL archive of {cfg.cluster}")
    push_wal_metrics(cfg, report, failed=not report.ok, status=status)
    if not report.ok:
        raise walcheck.WalCheckFailed(report)
    if watch_minutes and check_server:
        watch_archive_lag(cfg, watch_minutes, sample_every_seconds)
    return report
