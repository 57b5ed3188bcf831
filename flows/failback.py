"""Orchestration: the failback flow — back up, rebuild the old primary as a standby, switch over with zero loss, rejoin, DNS back.

The configured ``primary`` is home. After a failover another node is the primary; this flow
brings the role home with a controlled switchover (clean shutdown, final LSN replayed, promote)
and re-plans from observation at every start, so it resumes wherever an earlier run stopped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from pydantic import Field

from flows.common import human_bytes, logger
from flows.failover import (
    ReconnectFailed,
    Timeline,
    _finish,
    _record,
    approval_gate,
    check_replica_health,
    reconnect_apps,
    record_role_change_task,
    resolve_nodes,
    set_approval,
    switch_dns,
    validate_primary,
)
from flows.heartbeat import send_heartbeat
from flows.node_step import call_node_step, observe
from flows.params import ConfigPath, OptionalText
from tasks.config import Config, Node, load_config
from tasks.dns_switch import check_dns_config, node_dns_value
from tasks.errors import DRError, one_line
from tasks.failover import FailbackPlan, NodeState, Refused, Step, plan_failback
from tasks.hooks import ReconnectEvent
from tasks.node_steps import HERE, NodeStepArgs, NodeStepName, NodeStepResult, step_location
from tasks.reporting import report_key
from tasks.runreport import RunReport
from tasks.topology import (
    CleanStop,
    LagResult,
    RebuildResult,
    RewindFailed,
    SwitchoverResult,
    in_recovery,
    observe_node,
    promote_after_stop,
    wait_for_zero_lag,
)

if TYPE_CHECKING:
    from flows.backup import BackupReport


class FailbackReport(RunReport):
    home: str
    from_primary: str | None = None
    backup_id: str | None = None
    rebuild: RebuildResult | None = None
    rebuild_steps: list[RebuildResult] = []
    rewind_failed: str | None = None
    diverged_timeline: int | None = None
    fork_lsn: str | None = None  # where the current primary's timeline left home's
    end_lsn: str | None = None  # how far home's own WAL went
    # rpo_bytes (RunReport): what home wrote that never reached the node promoted in its place
    old_data: list[str] = []  # kept next to home's pgdata: the old data directory and/or its WAL
    old_data_bytes: int | None = None
    discarded: list[str] = []
    lag: LagResult | None = None
    switchover: SwitchoverResult | None = None
    rejoined: list[str] = []
    total_seconds: float | None = None
    started_at: datetime | None = None


def failback_markdown(r: FailbackReport) -> str:
    title = {
        "complete": f"Failback complete: {r.home} is the primary again",
        "refused": "Failback refused: nothing was switched",
        "failed": "Failback FAILED",
    }.get(r.status, f"Failback {r.status}")
    so = r.switchover
    rows = [
        ("status", r.status),
        ("home (configured primary)", r.home),
        ("switched over from", r.from_primary or "-"),
        (
            "write unavailability (clean shutdown to first write)",
            f"{so.unavailable_seconds:.2f} s" if so else "-",
        ),
        (
            "data loss",
            f"none: {r.home} replayed past the final checkpoint {so.final_checkpoint_lsn}"
            if so and so.final_checkpoint_lsn
            else "-",
        ),
        ("backup before failback", r.backup_id or "-"),
        (
            "rebuild",
            f"{r.rebuild.method} in {r.rebuild.seconds:.1f} s ({r.rebuild.detail})" if r.rebuild else "-",
        ),
        ("approved by", r.approval_text()),
        ("rejoined as standbys", ", ".join(r.rejoined) or "-"),
        *r.switch_rows(),
        ("total", f"{r.total_seconds:.1f} s" if r.total_seconds is not None else "-"),
    ]
    next_step = (
        "Nothing to do."
        if r.status == "complete"
        else "Re-run `gravl-dr failback`: it observes the nodes and resumes where this run stopped."
    )
    return r.render(title, rows, [next_step], before=old_data_section(r))


def old_data_section(r: FailbackReport) -> list[str]:
    """Where the data only the old primary had is, and how to get the transactions out of it."""
    if r.rpo_bytes is None and not r.old_data and not r.discarded:
        return []
    lines = [
        "",
        "## Data that never reached the new primary",
        f"- {r.home} wrote {r.rpo_bytes if r.rpo_bytes is not None else 'an unknown number of'} bytes of WAL "
        f"that were not replicated: timeline {r.diverged_timeline or '?'}, LSN {r.fork_lsn or '?'} to "
        f"{r.end_lsn or '?'}.",
    ]
    if r.rewind_failed:
        lines.append(f"- pg_rewind failed ({r.rewind_failed}); {r.home} was re-cloned instead.")
    for path in r.old_data:
        lines.append(
            f"- Kept: `{path}`"
            + (f" ({human_bytes(r.old_data_bytes)} in all)" if r.old_data_bytes is not None else "")
        )
    for path in r.discarded:
        lines.append(f"- Deleted as asked (--discard-old-data): `{path}`")
    if r.old_data and r.rpo_bytes:
        lines += [
            "- To see the transactions: `pg_waldump -p <kept>/pg_wal --timeline "
            f"{r.diverged_timeline or 1} --start {r.fork_lsn} --end {r.end_lsn}` (xids, relations, commits).",
            "- To get the rows back: copy a kept data directory (or restore the last backup taken before "
            "the failover and put the kept WAL in its pg_wal), start the copy on a spare port with no "
            f"archive_command and `recovery_target_timeline = '{r.diverged_timeline or 1}'`, read the rows "
            "committed after the fork point and re-apply them to the primary. Delete the kept copy "
            "afterwards.",
        ]
    return lines


# ------------------------------------------------------------------------------ tasks


@task(name="assess-home", cache_policy=NO_CACHE)
def assess_home(cfg: Config) -> NodeState:
    # Home's own files decide the rebuild (marker, control file): read them here or on its worker.
    return observe(cfg, cfg.primary, "primary", attempts=2, facts=True)


def _local_step(
    cfg: Config, node: Node, step: Step, name: NodeStepName, args: NodeStepArgs | None = None
) -> NodeStepResult:
    return call_node_step(cfg, node, name, args, where=step.where)


@task(name="stop-old-primary", cache_policy=NO_CACHE)
def stop_old_primary(cfg: Config, node: Node, step: Step) -> str:
    return _local_step(cfg, node, step, "stop-for-rebuild").detail


@task(name="save-local-settings", cache_policy=NO_CACHE)
def save_settings(cfg: Config, node: Node, step: Step) -> str:
    return _local_step(cfg, node, step, "save-local-settings").detail


@task(name="keep-old-wal", cache_policy=NO_CACHE)
def keep_wal(
    cfg: Config, node: Node, step: Step, timeline: int, fork_lsn: str, end_lsn: str
) -> tuple[str, int]:
    args = NodeStepArgs(timeline=timeline, fork_lsn=fork_lsn, end_lsn=end_lsn)
    res = _local_step(cfg, node, step, "keep-old-wal", args)
    return str(res.payload["path"]), int(res.payload["size"])


def _rebuild_task(name: str, step_name: NodeStepName) -> Any:
    @task(name=name, cache_policy=NO_CACHE)
    def rebuild(cfg: Config, node: Node, source: Node, step: Step) -> RebuildResult:
        res = _local_step(cfg, node, step, step_name, NodeStepArgs(source=source.name))
        return RebuildResult.model_validate(res.payload)

    return rebuild


rewind_old_primary = _rebuild_task("rewind-old-primary", "rewind")
reclone_old_primary = _rebuild_task("reclone-old-primary", "reclone")
start_standby = _rebuild_task("start-as-standby", "start-as-standby")


@task(name="discard-old-data", cache_policy=NO_CACHE)
def discard_old(cfg: Config, node: Node, step: Step) -> tuple[list[str], int]:
    res = _local_step(cfg, node, step, "discard-old-data")
    return [str(p) for p in res.payload["removed"]], int(res.payload["freed"])


@task(name="wait-for-zero-lag", cache_policy=NO_CACHE)
def wait_zero_lag(standby: Node, primary: Node, timeout: float) -> LagResult:
    return wait_for_zero_lag(standby, primary, timeout=timeout)


@task(name="switchover", cache_policy=NO_CACHE)
def switchover(cfg: Config, old: Node, new: Node, label: str, where: str) -> SwitchoverResult:
    """Clean shutdown of ``old`` where its files are (the plan's ``where``), then over libpq: ``new``
    replays past the shutdown checkpoint, is promoted, and takes the first write."""
    new_was_standby = in_recovery(new)
    if not new_was_standby:
        probe = observe_node(old, "replica", connect_timeout=3)
        if probe.reachable:
            raise Refused(f"split brain: {old.name} runs and {new.name} is already a primary")
    res = call_node_step(cfg, old, "stop-cleanly", where=where)
    stop = CleanStop.model_validate(res.payload)
    return promote_after_stop(old, new, stop, new_was_standby=new_was_standby, label=label)


@task(name="rejoin-former-primary", cache_policy=NO_CACHE)
def rejoin_former_primary(cfg: Config, node: Node, primary: Node, where: str) -> LagResult:
    call_node_step(cfg, node, "restart-as-standby", NodeStepArgs(source=primary.name), where=where)
    return wait_for_zero_lag(node, primary, timeout=120)


@task(name="finish-rebuild", cache_policy=NO_CACHE)
def finish_home_rebuild(cfg: Config, home: Node) -> str:
    """Home takes writes: its rebuild bookkeeping (marker, saved settings) must not outlive this."""
    where = step_location(home)
    if where is None:
        return "no data directory or worker for it: nothing to clean up"
    return call_node_step(cfg, home, "finish-rebuild", where=where).detail


def backup_current_primary(config_file: str | None, current: Node) -> BackupReport:
    """The backup flow as a subflow, on the operator's own config: it backs up the node that is
    the primary when it runs (it follows the primary, flows.common.follow_primary), which the
    plan expects to be ``current``; the report names the node it backed up."""
    from flows.backup import backup_flow

    report = backup_flow(config_path=config_file, kind="physical", dry_run=False)
    if report.node != current.name:
        logger().warning(
            "the backup was taken of %s, the primary when it ran, not %s", report.node, current.name
        )
    return report


# ------------------------------------------------------------------------------ the flow


@dataclass
class _Run:
    """What every step of one failback plan needs."""

    cfg: Config
    config_file: str | None
    plan: FailbackPlan
    report: FailbackReport
    tl: Timeline
    nodes: dict[str, Node]
    home: Node
    current: Node | None
    current_name: str | None
    approved_by: str | None
    auto_approve: bool
    approval_timeout_seconds: int
    catch_up_timeout_seconds: int
    dns_error: str | None = None

    def source(self) -> Node:
        assert self.current is not None
        return self.current


def _backup(r: _Run, step: Step) -> str:
    backup = backup_current_primary(r.config_file, r.source())
    r.report.backup_id = backup.backup_id
    return f"backup {backup.backup_id} of {backup.node}"


def _keep_wal(r: _Run, step: Step) -> str:
    p = r.plan
    assert p.diverged_timeline is not None and p.fork_lsn and p.end_lsn
    path, size = keep_wal(r.cfg, r.nodes[step.node], step, p.diverged_timeline, p.fork_lsn, p.end_lsn)
    if path not in r.report.old_data:
        r.report.old_data.append(path)
        r.report.old_data_bytes = (r.report.old_data_bytes or 0) + size
    return f"WAL {p.fork_lsn}..{p.end_lsn} of timeline {p.diverged_timeline} kept in {path} ({size} bytes)"


def _rebuild(r: _Run, step: Step) -> str:
    fn = {
        "rewind-old-primary": rewind_old_primary,
        "reclone-old-primary": reclone_old_primary,
        "start-as-standby": start_standby,
    }[step.kind]
    node = r.nodes[step.node]
    res: RebuildResult = fn(r.cfg, node, r.source(), step)
    r.report.rebuild_steps.append(res)
    if step.kind != "start-as-standby":
        r.report.rebuild = res
    if res.old_data and res.old_data not in r.report.old_data:
        r.report.old_data.append(res.old_data)
        r.report.old_data_bytes = (r.report.old_data_bytes or 0) + (res.old_data_bytes or 0)
    return f"{node.name}: {res.method} in {res.seconds:.1f}s ({res.detail})"


def _discard(r: _Run, step: Step) -> str:
    removed, freed = discard_old(r.cfg, r.nodes[step.node], step)
    r.report.discarded += removed
    r.report.old_data = [p for p in r.report.old_data if p not in removed]
    return f"deleted {len(removed)} kept director(ies), {freed} bytes"


def _wait_lag(r: _Run, step: Step) -> str:
    cur = r.source()
    r.report.lag = wait_zero_lag(r.nodes[step.node], cur, r.catch_up_timeout_seconds)
    return f"{step.node} replayed {r.report.lag.replay_lsn} = {cur.name}'s {r.report.lag.primary_lsn}"


def _approve(r: _Run, step: Step) -> str:
    record = approval_gate(
        what=f"switch over from {r.current_name} to {r.home.name}",
        plan_lines=r.report.plan,
        approved_by=r.approved_by,
        auto_approve=r.auto_approve,
        timeout_seconds=r.approval_timeout_seconds,
    )
    set_approval(r.report, record)
    return f"approved by {r.report.approver}" + (" (auto_approve)" if r.auto_approve else "")


def _switchover(r: _Run, step: Step) -> str:
    cur, home = r.source(), r.home
    so = switchover(r.cfg, cur, home, f"failback {r.tl.started.isoformat()}", step.where)
    r.report.switchover = so
    _record(
        r.report,
        r.tl,
        record_role_change_task(
            r.cfg, "failback", home.name, [cur.name], so.promote.timeline, so.promote.promoted_lsn
        ),
    )
    return (
        f"{cur.name} shut down cleanly at checkpoint {so.final_checkpoint_lsn}; {home.name} replayed "
        f"{so.replayed_lsn} and was promoted (timeline {so.promote.timeline}); writes were unavailable "
        f"{so.unavailable_seconds:.2f}s"
    )


def _rejoin(r: _Run, step: Step) -> str:
    lag = rejoin_former_primary(r.cfg, r.nodes[step.node], r.home, step.where)
    r.report.rejoined.append(step.node)
    return f"{step.node} streams from {r.home.name}, replayed {lag.replay_lsn}"


def _dns(r: _Run, step: Step) -> str:
    expected = [node_dns_value(n) for n in r.nodes.values() if n.name != r.home.name]
    try:
        r.report.dns = switch_dns(r.cfg, expected, node_dns_value(r.home))
    except DRError as exc:
        r.dns_error = f"DNS switch failed: {one_line(exc)}"
        return r.dns_error
    return r.report.dns.detail


def _reconnect(r: _Run, step: Step) -> str:
    if r.dns_error:
        return "skipped: DNS does not point at the primary"
    event = ReconnectEvent(
        cluster=r.cfg.cluster,
        event="failback",
        new_primary=r.home.name,
        old_primary=r.current_name or "-",
        host=node_dns_value(r.home),
        dns_record=r.cfg.dns.record,
    )
    r.report.hooks = reconnect_apps(r.cfg, event)
    return f"{sum(h.ok for h in r.report.hooks)}/{len(r.report.hooks)} hook(s) ok"


def _validate(r: _Run, step: Step) -> str:
    home = r.home
    r.report.canary = validate_primary(home, f"failback {r.tl.started.isoformat()}")
    finished = finish_home_rebuild(
        r.cfg, home
    )  # it takes writes: a stale rebuild marker must not outlive this
    demoted = [n for n in r.nodes if n != home.name]
    _record(r.report, r.tl, record_role_change_task(r.cfg, "failback", home.name, demoted, None, None))
    return f"canary write on {home.name} read back; {finished}"


_STEPS: dict[str, Callable[[_Run, Step], str]] = {
    "backup-current-primary": _backup,
    "stop-old-primary": lambda r, s: f"{s.node}: {stop_old_primary(r.cfg, r.nodes[s.node], s)}",
    "save-local-settings": lambda r, s: save_settings(r.cfg, r.nodes[s.node], s),
    "keep-old-wal": _keep_wal,
    "rewind-old-primary": _rebuild,
    "reclone-old-primary": _rebuild,
    "start-as-standby": _rebuild,
    "discard-old-data": _discard,
    "wait-for-zero-lag": _wait_lag,
    "approve": _approve,
    "switchover": _switchover,
    "rejoin-former-primary": _rejoin,
    "switch-dns": _dns,
    "reconnect-apps": _reconnect,
    "validate": _validate,
}


def _apply(r: _Run) -> str | None:
    """Apply the plan step by step; each step re-checks its own precondition. Returns a DNS error, if any."""
    for step in r.plan.steps:
        r.tl.add(step.kind, _STEPS[step.kind](r, step))
    if r.report.old_data and all(
        step_location(r.nodes[s.node]) == HERE for s in r.plan.steps if s.where == HERE
    ):
        from tasks.topology import dir_size

        r.report.old_data_bytes = sum(dir_size(Path(p)) for p in r.report.old_data if Path(p).exists())
    return r.dns_error


@flow(name="failback", log_prints=False, on_running=[send_heartbeat])
def failback_flow(
    config_path: ConfigPath = None,
    backup: Annotated[bool, Field(description="back up the current primary first")] = True,
    approved_by: OptionalText = None,
    auto_approve: Annotated[
        bool,
        Field(
            description="skip the approval form (shown in the report); a name in approved_by alone never does"
        ),
    ] = False,
    approval_timeout_seconds: Annotated[int, Field(ge=10, le=86400)] = 900,
    catch_up_timeout_seconds: Annotated[int, Field(ge=5, le=86400)] = 600,
    discard_old_data: Annotated[
        bool,
        Field(
            description="delete the old primary's kept data directory / WAL "
            "once it is rebuilt (default: keep it)"
        ),
    ] = False,
) -> FailbackReport:
    """Make the configured primary the primary again, with a zero-data-loss switchover.

    The old primary is rebuilt as a standby with pg_rewind when its cluster has
    wal_log_hints=on or data checksums (pg_rewind's prerequisite), else re-cloned with
    pg_basebackup. Both nodes' pgdata must be on the host running the flow.

    Args:
        config_path: The gravl-dr config file; empty: $GRAVL_DR_CONFIG of the worker, then
            gravl-dr.yaml in its working directory.
        backup: Take a physical backup of the current primary first (the backup flow).
        approved_by: Who approves (a name or a ticket): pre-fills the approval form's approver;
            it does not skip the form.
        auto_approve: Skip the approval form; the report says so (the CLI sets it after --yes or
            an approval typed on the terminal).
        approval_timeout_seconds: How long the approval form waits before nothing is switched.
        catch_up_timeout_seconds: How long the rebuilt node may take to stream with zero lag.
        discard_old_data: Delete what is kept of the old primary's data once it is rebuilt.
    """
    tl = Timeline()
    cfg = load_config(config_path)
    nodes = resolve_nodes(cfg)
    check_dns_config(cfg.dns)
    key = report_key("failback", cfg.cluster)
    home = cfg.primary
    report = FailbackReport(cluster=cfg.cluster, home=home.name, started_at=tl.started)
    try:
        for attempt in range(2):  # a failed pg_rewind leaves its marker: the second plan re-clones
            home_state = assess_home(cfg)
            others = check_replica_health(cfg)
            report.evidence = [home_state.evidence(), *(s.evidence() for s in others)]
            tl.add("assess", "; ".join(report.evidence))
            plan: FailbackPlan = plan_failback(
                home_state, others, backup=backup and attempt == 0, discard_old_data=discard_old_data
            )
            report.plan = [s.describe() for s in plan.steps]
            report.notes += [n for n in plan.notes if n not in report.notes]
            if plan.rpo_bytes is not None or report.rpo_bytes is None:
                report.diverged_timeline, report.fork_lsn = plan.diverged_timeline, plan.fork_lsn
                report.end_lsn, report.rpo_bytes = plan.end_lsn, plan.rpo_bytes
            report.old_data = list(home_state.kept_old_data)
            # The node we switch away from: the writable one, or (resuming) the one shut down cleanly.
            current_name = plan.current or next(
                (
                    s.name
                    for s in others
                    if not s.reachable and s.local_pgdata and s.control_state == "shut down"
                ),
                None,
            )
            current = nodes[current_name] if current_name else None
            report.from_primary = current_name
            tl.add("plan", ", ".join(plan.kinds()))
            try:
                dns_error = _apply(
                    _Run(
                        cfg,
                        config_path,
                        plan,
                        report,
                        tl,
                        nodes,
                        home,
                        current,
                        current_name,
                        approved_by,
                        auto_approve,
                        approval_timeout_seconds,
                        catch_up_timeout_seconds,
                    )
                )
                break
            except RewindFailed as exc:
                report.rewind_failed = one_line(exc)
                tl.add(
                    "rewind-old-primary",
                    f"{report.rewind_failed}: re-planning (the data directory is kept and re-cloned)",
                )
                if attempt:
                    raise
        problems = ([dns_error] if dns_error else []) + [
            f"reconnect hook {h.kind} {h.target} failed: {h.message}" for h in report.hooks if not h.ok
        ]
        if problems:
            raise ReconnectFailed("; ".join(problems) + f" — {home.name} is the primary")
        report.status = "complete"
    except Refused as exc:
        report.status, report.error = "refused", one_line(exc)
        tl.add("refused", report.error)
        report.timeline = tl.events
        _finish(cfg, report, key, "failback", failback_markdown, {})
        raise
    except BaseException as exc:
        report.status, report.error = "failed", one_line(exc)
        tl.add("failed", report.error)
        report.timeline, report.total_seconds = tl.events, tl.elapsed()
        _finish(cfg, report, key, "failback", failback_markdown, {})
        raise
    report.total_seconds = tl.elapsed()
    tl.add("report", f"done in {report.total_seconds:.1f}s")
    report.timeline = tl.events
    metrics: dict[str, float] = {
        "gravl_failback_duration_seconds": report.total_seconds,
        "gravl_failback_old_data_bytes": float(report.old_data_bytes or 0),
    }
    if report.rpo_bytes is not None:
        metrics["gravl_failback_unreplicated_bytes"] = float(report.rpo_bytes)
    if report.switchover:
        metrics["gravl_failback_write_unavailable_seconds"] = report.switchover.unavailable_seconds
    _finish(cfg, report, key, "failback", failback_markdown, metrics)
    return report
