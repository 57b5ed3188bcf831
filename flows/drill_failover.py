"""Orchestration: the ``drill-failover`` flow — a DR drill: planned failover, then failback home.

One name everywhere: flow, CLI command and metrics job ``drill-failover``, deployment
``drill-failover-manual``, artifact ``drill-failover-report-<cluster>``.
"""

from __future__ import annotations

import time
from typing import Annotated

from prefect import flow
from pydantic import BaseModel, Field

from flows.common import publish_report, push_flow_metrics
from flows.failback import FailbackReport, failback_flow
from flows.failover import FailoverReport, failover_flow
from flows.heartbeat import send_heartbeat
from flows.params import ConfigPath, OptionalText
from tasks.config import load_config
from tasks.failover import DEFAULT_MAX_LAG_BYTES
from tasks.reporting import document, kv_table, report_key

JOB = "drill-failover"


class DrillFailoverReport(BaseModel):
    cluster: str
    failover: FailoverReport
    failback: FailbackReport


@flow(name="drill-failover", log_prints=False, on_running=[send_heartbeat])
def drill_failover_flow(
    config_path: ConfigPath = None,
    backup: bool = False,
    max_lag_bytes: Annotated[int, Field(ge=0, le=2**40)] = DEFAULT_MAX_LAG_BYTES,
    approved_by: OptionalText = None,
    auto_approve: Annotated[
        bool, Field(description="skip both approval forms (shown in the reports)")
    ] = False,
) -> DrillFailoverReport:
    """A DR drill: planned failover to a replica (clean stop, no data loss), then failback home.

    Args:
        config_path: The gravl-dr config file; empty: $GRAVL_DR_CONFIG of the worker, then
            gravl-dr.yaml in its working directory.
        backup: Back up the temporary primary before failing back.
        max_lag_bytes: Refuse a replica further behind than this many bytes of WAL.
        approved_by: Who approves (a name or a ticket): pre-fills the approval forms' approver.
        auto_approve: Skip both approval forms (before failover and before failback); the
            reports say so. Without it the run pauses twice for the approval form.
    """
    cfg = load_config(config_path)
    fo = failover_flow(
        config_path=config_path,
        planned=True,
        max_lag_bytes=max_lag_bytes,
        approved_by=approved_by,
        auto_approve=auto_approve,
    )
    fb = failback_flow(
        config_path=config_path, backup=backup, approved_by=approved_by, auto_approve=auto_approve
    )
    so = fb.switchover
    rows = [
        (
            "failover",
            f"{fo.old_primary} -> {fo.new_primary}: RTO {fo.rto_seconds:.2f} s, RPO {fo.rpo_bytes} bytes"
            if fo.rto_seconds is not None
            else fo.status,
        ),
        (
            "failback",
            f"{fb.from_primary} -> {fb.home}: writes unavailable {so.unavailable_seconds:.2f} s"
            if so
            else fb.status,
        ),
        ("failover DNS", fo.dns.detail if fo.dns else "-"),
        ("failback DNS", fb.dns.detail if fb.dns else "-"),
    ]
    md = document(
        [
            f"# Failover drill of {cfg.cluster}: passed",
            "",
            *kv_table(rows),
            "",
            "Full reports: artifacts `failover-report-*` and `failback-report-*`.",
        ]
    )
    publish_report(report_key(JOB, cfg.cluster), md, f"failover drill of {cfg.cluster}")
    push_flow_metrics(
        cfg,
        JOB,
        {
            "gravl_drill_failover_last_success_timestamp_seconds": time.time(),
            "gravl_drill_failover_rto_seconds": fo.rto_seconds or 0.0,
            "gravl_drill_failover_switchover_unavailable_seconds": so.unavailable_seconds if so else 0.0,
        },
    )
    return DrillFailoverReport(cluster=cfg.cluster, failover=fo, failback=fb)
