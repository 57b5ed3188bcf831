"""Adapter: the catalog of every ``gravl_*`` metric, and pushing them to a Prometheus Pushgateway.

The catalog is the one home of metric names: each with its type, help text, the jobs (flow names)
that push it and its grouping labels. The flows push by name and get the help text from here; the
Grafana dashboard, the alert rules and the README's metrics table are tested against it.

Pushes use POST (pushadd) so that a failure push does not wipe the last-success series of the
same group. Grouping: job = flow name, plus the metric's labels (cluster; kind where a flow has
kinds; replica for replication lag).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Literal

from tasks.errors import StorageUnavailable
from tasks.reporting import table

log = logging.getLogger(__name__)

Outcome = Literal["success", "failure", "refusal"]


@dataclass(frozen=True)
class Metric:
    """One pushed metric: what it means, who pushes it, how it is grouped."""

    name: str
    help: str
    jobs: tuple[str, ...]
    labels: tuple[str, ...] = ("cluster",)
    type: Literal["gauge"] = "gauge"


def _job(job: str, labels: tuple[str, ...], *entries: tuple[str, str]) -> list[Metric]:
    return [Metric(name, help_text, (job,), labels) for name, help_text in entries]


def _outcomes(job: str, what: str) -> list[Metric]:
    """``gravl_<job>_last_{success,failure,refusal}_timestamp_seconds`` of a failover-like job."""
    return _job(
        job,
        ("cluster",),
        (f"gravl_{job}_last_success_timestamp_seconds", f"Time of the last successful {what}"),
        (f"gravl_{job}_last_failure_timestamp_seconds", f"Time of the last failed {what}"),
        (f"gravl_{job}_last_refusal_timestamp_seconds", f"Time of the last refused {what}"),
    )


_BACKUP = ("cluster", "kind")
_ALL: list[Metric] = [
    *_job(
        "backup",
        _BACKUP,
        ("gravl_backup_last_success_timestamp_seconds", "Time of the last successful backup"),
        ("gravl_backup_last_failure_timestamp_seconds", "Time of the last failed backup"),
        ("gravl_backup_duration_seconds", "Wall time of the last backup"),
        ("gravl_backup_raw_bytes", "Raw size of the last backup"),
        ("gravl_backup_stored_bytes", "Stored size of the last backup"),
        ("gravl_backup_stream_seconds", "Data path time of the last backup"),
    ),
    Metric(
        "gravl_split_brain",
        "1 when more than one node runs as a primary",
        ("backup", "wal-check"),
    ),
    *_job(
        "wal-check",
        ("cluster",),
        ("gravl_wal_check_last_success_timestamp_seconds", "Time of the last good WAL check"),
        ("gravl_wal_check_last_failure_timestamp_seconds", "Time of the last failed WAL check"),
        ("gravl_wal_archive_gaps", "Missing segment ranges in the WAL archive"),
        ("gravl_wal_archive_problems", "WAL archive problems found"),
        ("gravl_wal_archived_files", "Files in the WAL archive"),
        ("gravl_wal_archive_lag_bytes", "WAL written but not yet archived"),
        ("gravl_wal_archive_lag_seconds", "Age of unarchived WAL"),
        ("gravl_wal_lag_sample_timestamp_seconds", "When the archive lag was last sampled"),
        ("gravl_wal_archiver_archived_count", "pg_stat_archiver.archived_count"),
        ("gravl_wal_archiver_failed_count", "pg_stat_archiver.failed_count"),
        ("gravl_wal_last_archived_timestamp_seconds", "When the server last archived a file"),
        ("gravl_wal_ready_files", "Files waiting to be archived"),
        ("gravl_primary_up", "1 when the configured primary accepts connections and is not in recovery"),
    ),
    *_job(
        "wal-check",
        ("cluster", "replica"),
        (
            "gravl_replication_lag_bytes",
            "Bytes of WAL the replica has not replayed yet (NaN until it reports its replay position)",
        ),
    ),
    *_job(
        "drill",
        _BACKUP,
        ("gravl_drill_success", "1 if the last restore drill passed"),
        ("gravl_drill_last_run_timestamp_seconds", "Time of the last restore drill"),
        ("gravl_drill_last_success_timestamp_seconds", "Time of the last passed restore drill"),
        ("gravl_drill_duration_seconds", "Wall time of the last restore drill"),
        ("gravl_drill_failed_checks", "Failed checks in the last drill"),
        ("gravl_drill_rto_seconds", "Measured restore RTO of the last drill"),
        ("gravl_drill_rpo_seconds", "Data age (RPO) of the last drilled restore"),
    ),
    *_outcomes("failover", "failover"),
    *_job(
        "failover",
        ("cluster",),
        ("gravl_failover_rto_seconds", "Last failover: flow start to validated write"),
        ("gravl_failover_rpo_bytes", "Last failover: WAL bytes the new primary lacked"),
        (
            "gravl_failover_old_primary_unfenced",
            "1 when the last failover could not fence the old primary (split-brain risk)",
        ),
    ),
    *_outcomes("failback", "failback"),
    *_job(
        "failback",
        ("cluster",),
        ("gravl_failback_duration_seconds", "Last failback: total wall time"),
        ("gravl_failback_write_unavailable_seconds", "Last failback: clean shutdown to first write"),
        (
            "gravl_failback_old_data_bytes",
            "Bytes of the old primary's data kept next to its data directory (delete them once read)",
        ),
        (
            "gravl_failback_unreplicated_bytes",
            "Last failback: WAL bytes the old primary wrote that never reached the new one",
        ),
    ),
    *_job(
        "drill-failover",
        ("cluster",),
        ("gravl_drill_failover_last_success_timestamp_seconds", "Last passed failover drill"),
        ("gravl_drill_failover_rto_seconds", "Failover drill: RTO"),
        (
            "gravl_drill_failover_switchover_unavailable_seconds",
            "Failover drill: failback write unavailability",
        ),
    ),
    *_job(
        "expire",
        ("cluster",),
        ("gravl_expire_last_success_timestamp_seconds", "Time of the last retention run"),
        ("gravl_expire_backups_kept", "Backups kept by the last retention run"),
        ("gravl_expire_backups_expired", "Backups expired by the last retention run"),
        ("gravl_expire_wal_expired", "WAL files expired by the last retention run"),
        ("gravl_expire_backups_broken", "Backups found broken or with an unreadable manifest"),
    ),
]

CATALOG: Final[Mapping[str, Metric]] = {m.name: m for m in _ALL}
if len(CATALOG) != len(_ALL):  # pragma: no cover - a name listed twice is a bug of this file
    raise RuntimeError("a metric is listed twice in the catalog")


def outcome_metric(job: str, outcome: Outcome) -> str:
    """The name of ``job``'s last-``outcome`` timestamp (failover and failback)."""
    name = f"gravl_{job}_last_{outcome}_timestamp_seconds"
    if name not in CATALOG:
        raise ValueError(f"no metric {name} in the catalog")
    return name


def check_push(job: str, grouping: Mapping[str, str], names: Iterable[str]) -> None:
    """Refuse (ValueError: a bug, not an operating condition) a name outside the catalog, a job
    that does not push it, or grouping labels other than the metric's."""
    for name in names:
        metric = CATALOG.get(name)
        if metric is None:
            raise ValueError(f"metric {name} is not in the catalog (tasks/metrics.py)")
        if job not in metric.jobs:
            raise ValueError(f"metric {name} is pushed by {', '.join(metric.jobs)}, not by job {job}")
        if set(grouping) != set(metric.labels):
            raise ValueError(
                f"metric {name} is grouped by {', '.join(metric.labels)}, not {', '.join(grouping)}"
            )


def push_metrics(
    gateway: str | None,
    job: str,
    grouping: Mapping[str, str],
    values: Mapping[str, float],
    timeout: float = 10,
) -> bool:
    """Push catalog gauges ``name -> value`` (help texts from the catalog); returns False when no
    gateway is configured. Names are checked against the catalog first, gateway or not."""
    check_push(job, grouping, values)
    if not gateway:
        return False
    from prometheus_client import CollectorRegistry, Gauge, pushadd_to_gateway

    registry = CollectorRegistry()
    for name, value in values.items():
        Gauge(name, CATALOG[name].help, registry=registry).set(value)
    try:
        pushadd_to_gateway(gateway, job=job, registry=registry, grouping_key=dict(grouping), timeout=timeout)
    except OSError as exc:
        raise StorageUnavailable(f"cannot push metrics to {gateway}: {exc}") from None
    log.info("pushed %d metric(s) to %s (job=%s %s)", len(values), gateway, job, dict(grouping))
    return True


def catalog_table() -> list[str]:
    """The README's metrics table: one row per metric, in catalog order."""
    return table(
        ("metric", "type", "job", "grouping", "meaning"),
        (
            (f"`{m.name}`", m.type, ", ".join(f"`{j}`" for j in m.jobs), ", ".join(m.labels), m.help)
            for m in _ALL
        ),
    )
