"""Orchestration: the ``expire`` flow (retention) — survey the repository, plan, expire backups, expire WAL.

One name everywhere: flow, CLI command and metrics job ``expire``, deployment ``expire-daily``,
artifact ``expire-report-<cluster>``, metrics ``gravl_expire_*``.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from flows.common import NETWORK_RETRIES, load, logger, publish_report, push_flow_metrics
from flows.heartbeat import send_heartbeat
from flows.params import ConfigPath
from tasks import retention as steps
from tasks.config import Config
from tasks.reporting import bullets, document, kv_table, report_key, section
from tasks.repository import Repository


class RetentionReport(BaseModel):
    dry_run: bool
    kept: list[str] = []
    expired: list[str] = []
    orphan_objects: int = 0
    wal_expired: int = 0
    wal_kept: int = 0
    wal_kept_from: list[str] = []
    notes: list[str] = []
    leftovers: list[str] = []
    leftover_bytes: int = 0
    node_step_results: int = 0  # node-step outcomes older than retention.node_step_days
    broken: dict[str, str] = {}
    invalid: dict[str, str] = {}
    verified: list[str] = []
    seconds: float = 0.0


@task(name="survey-repository", cache_policy=NO_CACHE, **NETWORK_RETRIES)
def survey_repository(repo: Repository) -> steps.RepositoryState:
    state = steps.read_state(repo)
    logger().info(
        "%s holds %d complete backup(s), %d backup object(s) and %d WAL file(s)",
        repo.url,
        len(state.manifests),
        len(state.backup_keys),
        len(state.wal_keys),
    )
    return state


@task(name="verify-backups", cache_policy=NO_CACHE, **NETWORK_RETRIES)
def verify_backups(cfg: Config, repo: Repository, state: steps.RepositoryState) -> steps.RepositoryState:
    checked = steps.verify_backups(repo, state, cfg.retention, cfg.cluster)
    log = logger()
    for bid in checked.verified:
        log.info("backup %s re-read in full: sizes and SHA-256 match", bid)
    for bid, why in sorted(checked.broken.items()):
        log.error("backup %s is BROKEN: %s; it does not count toward min_full", bid, why)
    for bid, why in sorted(checked.invalid.items()):
        log.error("backup %s is INVALID: %s; its folder is left alone", bid, why)
    return checked


@task(name="plan-retention", cache_policy=NO_CACHE)
def plan_retention(cfg: Config, state: steps.RepositoryState) -> steps.RetentionPlan:
    pol = cfg.retention
    plan = steps.plan_retention(
        state, pol, datetime.now(UTC), cfg.cluster, orphan_grace=timedelta(hours=pol.incomplete_grace_hours)
    )
    log = logger()
    log.info(
        "policy: keep the newest %d backup(s) of each kind and all that ended within %d days",
        pol.min_full,
        pol.full_days,
    )
    for d in plan.decisions:
        log.info("%s %s: %s", "keep" if d.keep else "EXPIRE", d.backup_id, d.reason)
    for need in plan.wal_needs:
        log.info(
            "backup %s needs WAL from timeline %d, segment %08X%s onward",
            need.backup_id,
            need.timeline,
            need.timeline,
            need.position,
        )
    log.info("WAL: %d file(s) to expire, %d kept", len(plan.expire_wal), plan.kept_wal)
    for note in plan.notes:
        log.info(note)
    return plan


@task(name="expire-backups", cache_policy=NO_CACHE, **NETWORK_RETRIES)
def expire_backups(repo: Repository, plan: steps.RetentionPlan) -> int:
    log = logger()
    deleted = 0
    for b in plan.expire:
        n = steps.expire_backup(repo, b)
        deleted += n
        log.info("expired backup %s: manifest removed first, then %d object(s)", b.backup_id, n - 1)
    if plan.orphan_keys:
        n = steps.delete_keys(repo, plan.orphan_keys)
        deleted += n
        log.info("removed %d object(s) of unlisted (incomplete) backups", n)
    return deleted


@task(name="sweep-leftovers", cache_policy=NO_CACHE, **NETWORK_RETRIES)
def sweep_leftovers(
    cfg: Config, repo: Repository, state: steps.RepositoryState, dry_run: bool
) -> tuple[list[str], int]:
    """Open multipart uploads and temporary files of killed runs, older than the grace period."""
    grace = timedelta(hours=cfg.retention.incomplete_grace_hours)
    items = steps.find_leftovers(repo, grace, state.locked_backup_id)
    size = sum(i.size for i in items)
    log = logger()
    for item in items:
        log.info("%s leftover %s", "would sweep" if dry_run else "sweeping", item.describe())
    if items and not dry_run:
        size = steps.sweep_leftovers(repo, items)
        log.info("freed %d byte(s) in %d leftover(s) of killed or failed runs", size, len(items))
    return [i.describe() for i in items], size


@task(name="expire-node-step-results", cache_policy=NO_CACHE, **NETWORK_RETRIES)
def expire_node_step_results(cfg: Config, repo: Repository, dry_run: bool) -> tuple[int, list[str]]:
    """The outcomes node-step runs recorded, once older than retention.node_step_days."""
    days = cfg.retention.node_step_days
    old, notes = steps.expired_step_results(
        steps.read_step_result_times(repo), datetime.now(UTC), timedelta(days=days)
    )
    if old and not dry_run:
        steps.delete_keys(repo, old)
    if old:
        logger().info(
            "%s %d node-step outcome(s) older than %g days",
            "would expire" if dry_run else "expired",
            len(old),
            days,
        )
    return len(old), notes


@task(name="expire-wal", cache_policy=NO_CACHE, **NETWORK_RETRIES)
def expire_wal(repo: Repository, plan: steps.RetentionPlan) -> int:
    if not plan.expire_wal:
        logger().info("no WAL to expire")
        return 0
    n = steps.delete_keys(repo, plan.expire_wal)
    logger().info("expired %d WAL file(s), %s .. %s", n, plan.expire_wal[0], plan.expire_wal[-1])
    return n


@task(name="push-retention-metrics", cache_policy=NO_CACHE)
def push_retention_metrics(cfg: Config, report: RetentionReport) -> None:
    values = {
        "gravl_expire_last_success_timestamp_seconds": time.time(),
        "gravl_expire_backups_kept": float(len(report.kept)),
        "gravl_expire_backups_expired": float(len(report.expired)),
        "gravl_expire_wal_expired": float(report.wal_expired),
        "gravl_expire_backups_broken": float(len(report.broken) + len(report.invalid)),
    }
    push_flow_metrics(cfg, "expire", values)


def _markdown(report: RetentionReport, cfg: Config, repo_url: str) -> str:
    head = "dry run: nothing deleted" if report.dry_run else "done"
    lines = [
        f"# Retention for {cfg.cluster}: {head}",
        "",
        f"Policy: keep the newest {cfg.retention.min_full} backup(s) of each kind and every backup "
        f"that ended within {cfg.retention.full_days} days; keep the WAL they need.",
        "",
        *kv_table(
            [
                ("repository", repo_url),
                ("backups kept", len(report.kept)),
                (f"backups {'to expire' if report.dry_run else 'expired'}", len(report.expired)),
                ("orphaned objects", report.orphan_objects),
                ("leftovers of killed runs", f"{len(report.leftovers)} ({report.leftover_bytes} bytes)"),
                (f"WAL files {'to expire' if report.dry_run else 'expired'}", report.wal_expired),
                ("WAL files kept", report.wal_kept),
                (
                    f"node-step outcomes {'to expire' if report.dry_run else 'expired'}",
                    report.node_step_results,
                ),
                ("WAL kept from", ", ".join(report.wal_kept_from) or "everything"),
                ("took", f"{report.seconds:.1f} s"),
            ]
        ),
    ]
    bad = {**report.broken, **report.invalid}
    if bad:
        lines[0:1] = [
            lines[0],
            "",
            f"**{len(bad)} backup(s) cannot be restored; they are not counted toward "
            "min_full. Look at them now.**",
        ]
        lines += section(
            "Broken or invalid backups", bullets(f"`{b}`: {why}" for b, why in sorted(bad.items()))
        )
    if report.verified:
        lines += section("Re-read in full before counting", bullets(f"`{b}`" for b in report.verified))
    if report.expired:
        lines += section("Expired backups", bullets(f"`{b}`" for b in report.expired))
    if report.leftovers:
        lines += section(
            "Leftovers to sweep" if report.dry_run else "Leftovers swept", bullets(report.leftovers)
        )
    if report.notes:
        lines += section("Notes", bullets(report.notes))
    return document(lines)


@flow(name="expire", log_prints=False, on_running=[send_heartbeat])
def expire_flow(config_path: ConfigPath = None, dry_run: bool = False) -> RetentionReport:
    """Expire backups and WAL beyond the retention policy (retention.full_days, retention.min_full).

    Args:
        config_path: The gravl-dr config file; empty: $GRAVL_DR_CONFIG of the worker, then
            gravl-dr.yaml in its working directory.
        dry_run: Report what the policy would expire; delete nothing.
    """
    t0 = time.monotonic()
    cfg, repo = load(config_path)
    state = verify_backups(cfg, repo, survey_repository(repo))
    plan = plan_retention(cfg, state)
    report = RetentionReport(
        dry_run=dry_run,
        kept=plan.kept,
        expired=[b.backup_id for b in plan.expire],
        orphan_objects=len(plan.orphan_keys),
        wal_expired=len(plan.expire_wal),
        wal_kept=plan.kept_wal,
        wal_kept_from=[f"{n.timeline:08X}{n.position} ({n.backup_id})" for n in plan.wal_needs],
        notes=plan.notes,
        broken=state.broken,
        invalid=state.invalid,
        verified=state.verified,
    )
    report.leftovers, report.leftover_bytes = sweep_leftovers(cfg, repo, state, dry_run)
    report.node_step_results, step_notes = expire_node_step_results(cfg, repo, dry_run)
    report.notes = [*report.notes, *step_notes]
    if not dry_run:
        expire_backups(repo, plan)
        expire_wal(repo, plan)
    report.seconds = time.monotonic() - t0
    publish_report(
        report_key("expire", cfg.cluster),
        _markdown(report, cfg, repo.url),
        "retention dry run" if dry_run else "retention run",
    )
    if not dry_run:
        push_retention_metrics(cfg, report)
    return report
