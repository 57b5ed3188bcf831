"""Orchestration: the failover flow — assess, check replicas, fence, approve, promote, switch DNS, reconnect, validate, report.

Plan, then apply: the nodes are observed, tasks.failover turns the observation into an ordered
plan (or a refusal), and each step re-checks its own precondition when it runs, so a re-run after
an interruption converges. Promotion and DNS switch never retry blindly; the next run re-plans.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.input import RunInput
from prefect.states import Completed
from pydantic import BaseModel, Field

from flows.common import human_bytes, logger, publish_report, push_flow_metrics
from flows.heartbeat import send_heartbeat
from flows.node_step import call_node_step, observe
from flows.params import ConfigPath, OptionalText
from tasks.config import Config, Node, load_config
from tasks.dns_switch import DNSChange, check_dns_config, node_dns_value, switch_record
from tasks.errors import ConfigError, DRError, PermanentError, one_line
from tasks.failover import (
    DEFAULT_MAX_LAG_BYTES,
    FailoverPlan,
    FenceAhead,
    NodeState,
    Refused,
    Step,
    plan_failover,
    rpo_bytes,
)
from tasks.hooks import HookResult, ReconnectEvent, run_hooks
from tasks.metrics import outcome_metric
from tasks.node_steps import NodeStepArgs
from tasks.reporting import bullets, report_key, section
from tasks.runreport import RunReport
from tasks.runreport import (
    TimelineEvent as TimelineEvent,  # re-exported: failback builds its timeline with it
)
from tasks.topology import (
    CanaryResult,
    FenceResult,
    PromoteResult,
    canary_write,
    fence_read_only,
    not_fenced,
    observe_node,
    promote_node,
)


class ReconnectFailed(PermanentError):
    """One or more reconnect hooks failed after the database steps succeeded."""


# ------------------------------------------------------------------------------ shared pieces


class Approval(RunInput):
    """The form an operator fills in the Prefect UI to let a failover or failback go on."""

    approve: bool = Field(description="Go ahead? Untick to stop here with nothing promoted.")
    approver: str = Field(min_length=1, max_length=200, description="Your name, for the report.")
    comment: str = Field(default="", max_length=2000, description="Why (incident number, ...).")


class Timeline:
    """Timestamps each step against the flow's start: the RTO is read off it."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.started = datetime.now(UTC)
        self.events: list[TimelineEvent] = []

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def add(self, step: str, text: str) -> float:
        offset = self.elapsed()
        self.events.append(
            TimelineEvent(
                at=self.started + timedelta(seconds=offset),
                offset_seconds=round(offset, 3),
                step=step,
                text=text,
            )
        )
        logger().info("[%s] %s", step, text)
        return offset


def resolve_nodes(cfg: Config) -> dict[str, Node]:
    nodes: dict[str, Node] = {}
    for node in [cfg.primary, *cfg.replicas]:
        if node.name in nodes:
            raise ConfigError(
                f"node name {node.name!r} is used twice (primary and replicas need distinct names)"
            )
        nodes[node.name] = node
    return nodes


class ApprovalRecord(BaseModel):
    """Who let the run go on, when, and how (the form, or an explicit auto_approve)."""

    approver: str
    at: datetime
    how: str  # "approval form" | "auto_approve"
    note: str


@task(name="approve", cache_policy=NO_CACHE)
def approve(what: str, approver: str, how: str, note: str, approved: bool) -> ApprovalRecord:
    """The approval gate as a step of the run: it records the decision, or stops the run here."""
    if not approved:
        raise Refused(f"{note}: {what} not done")
    record = ApprovalRecord(approver=approver, at=datetime.now(UTC), how=how, note=note)
    logger().info("%s: approved by %s at %s (%s: %s)", what, approver, f"{record.at:%H:%M:%S} UTC", how, note)
    return record


def approval_gate(
    *,
    what: str,
    plan_lines: list[str],
    approved_by: str | None,
    auto_approve: bool,
    timeout_seconds: int,
    poll_interval: int = 1,
) -> ApprovalRecord:
    """Pause for the typed approval form, unless ``auto_approve`` (explicit, shown in the report).

    A name in ``approved_by`` alone never skips the gate: it only pre-fills the form's approver.
    The pause itself is the flow's (Prefect pauses flow runs, not task runs); the decision is the
    ``approve`` task, visible in the run with who, when and how.
    """
    if auto_approve:
        return approve(
            what,
            approved_by or "auto_approve",
            "auto_approve",
            "auto_approve=true: the approval form was skipped",
            True,
        )
    from prefect.flow_runs import pause_flow_run

    description = f"**{what}**\n\n" + "\n".join(f"- {line}" for line in plan_lines)
    logger().warning("waiting up to %ss for approval in the Prefect UI: %s", timeout_seconds, what)
    initial: dict[str, Any] = {"description": description, "approve": False}
    if approved_by:
        initial["approver"] = approved_by
    try:
        answer = pause_flow_run(
            wait_for_input=Approval.with_initial_data(**initial),
            timeout=timeout_seconds,
            poll_interval=poll_interval,
        )
    except Exception as exc:
        if type(exc).__name__ == "FlowPauseTimeout":
            return approve(what, "-", "approval form", f"no approval within {timeout_seconds}s", False)
        raise
    if not answer.approve:
        return approve(
            what,
            answer.approver,
            "approval form",
            f"{answer.approver} declined" + (f" ({answer.comment})" if answer.comment else ""),
            False,
        )
    return approve(what, answer.approver, "approval form", answer.comment or "approved in the UI", True)


def set_approval(report: RunReport, record: ApprovalRecord) -> None:
    report.approver, report.approval_note = record.approver, record.note
    report.approved_at, report.auto_approved = record.at, record.how == "auto_approve"


# ------------------------------------------------------------------------------ tasks


@task(name="assess-primary", cache_policy=NO_CACHE)
def assess_primary(cfg: Config, ahead: FenceAhead | None = None) -> tuple[NodeState, FenceResult | None]:
    """Observe the primary. When it does not answer and its own worker is asked for its files'
    facts, that worker also gets ``ahead`` (the planner's other inputs) and fences it in the same
    run when the plan would fence it first: the fence result comes back with the state."""
    # The node's own files count only when it does not answer (was it fenced? how far did its WAL go?).
    reported: dict[str, Any] = {}
    state = observe(
        cfg,
        cfg.primary,
        "primary",
        attempts=3,
        facts=False,
        fence_ahead=ahead.model_dump_json() if ahead is not None else None,
        reported=reported,
    )
    logger().info("%s", state.evidence())
    if reported.get("fence_decision"):
        logger().info("%s: %s", cfg.primary.name, reported["fence_decision"])
    fence = FenceResult.model_validate(reported["fence"]) if reported.get("fence") else None
    return state, fence


@task(name="check-replica-health", cache_policy=NO_CACHE)
def check_replica_health(cfg: Config, facts: bool = False) -> list[NodeState]:
    states = [observe(cfg, r, "replica", attempts=2, facts=facts) for r in cfg.replicas]
    for s in states:
        logger().info("%s", s.evidence())
    return states


@task(name="fence-old-primary", cache_policy=NO_CACHE)
def fence_old_primary(cfg: Config, node: Node, step: Step) -> FenceResult:
    """Fence as the plan decided: stop and mark (here or on the node's worker), or read-only over SQL."""
    if step.method == "stop":
        try:
            res = FenceResult.model_validate(
                call_node_step(cfg, node, "fence", NodeStepArgs(clean=True), where=step.where).payload
            )
        except DRError as exc:
            logger().warning(
                "%s: fence by stopping failed (%s): making it read-only instead", node.name, one_line(exc)
            )
            res = fence_read_only(node)
            res = res.model_copy(update={"action": f"stop failed ({one_line(exc)}); {res.action}"})
    elif step.method == "read-only":
        res = fence_read_only(node)
    else:
        res = not_fenced(
            node,
            f"unreachable, and its work pool {node.work_pool}'s worker did not report (see the evidence)"
            if node.work_pool
            else "unreachable, and neither its pgdata nor a work pool of it is known",
        )
    (logger().info if res.fenced else logger().warning)("%s: %s", node.name, res.action)
    return res


@task(name="promote-replica", cache_policy=NO_CACHE)
def promote_replica(cfg: Config, target: Node, old_primary: Node, force: bool) -> PromoteResult:
    # Precondition, re-checked now: the old primary must not have come back accepting writes.
    old = observe_node(old_primary, "primary", os_user=cfg.postgres.os_user, bindir=cfg.postgres.bindir)
    if old.accepts_writes and not force:
        raise Refused(
            f"{old_primary.name} accepts writes again: not promoting {target.name} "
            "(re-run to fence it, or --force)"
        )
    if old.alive_but_refusing and not force:
        raise Refused(
            f"{old_primary.name} is alive (it answered: {old.error}): not promoting "
            f"{target.name} (--force to accept the split-brain risk)"
        )
    res = promote_node(target)
    if res.already_primary:
        logger().info("%s is already a primary (timeline %s): nothing to promote", target.name, res.timeline)
    else:
        logger().info(
            "promoted %s in %.2fs: timeline %s starts at %s",
            target.name,
            res.seconds,
            res.timeline,
            res.promoted_lsn,
        )
    return res


@task(name="switch-dns", cache_policy=NO_CACHE)
def switch_dns(cfg: Config, expected: list[str], new_value: str) -> DNSChange:
    change = switch_record(cfg.dns, expected=expected, new_value=new_value)
    logger().info("%s", change.detail)
    return change


@task(name="reconnect-apps", cache_policy=NO_CACHE)
def reconnect_apps(cfg: Config, event: ReconnectEvent) -> list[HookResult]:
    if not cfg.reconnect:
        logger().info("no reconnect hooks configured")
    return run_hooks(cfg.reconnect, event)


@task(name="validate", cache_policy=NO_CACHE)
def validate_primary(node: Node, label: str) -> CanaryResult:
    res = canary_write(node, label)
    logger().info("canary row %s written and read back on %s at %s", res.row_id, node.name, res.lsn)
    return res


@task(name="record-role-change", cache_policy=NO_CACHE)
def record_role_change_task(
    cfg: Config,
    event: Literal["failover", "failback"],
    primary: str,
    demoted: list[str],
    timeline: int | None,
    lsn: str | None,
) -> str:
    """Append the change to the repository's role history (what `gravl-dr guard` and every flow read).

    Never fails the run: the promotion stands whether or not the repository answers.
    """
    from tasks.repository import open_repository
    from tasks.roles import RoleEvent, now, record_role_change, role_history

    try:
        repo = open_repository(cfg.repository)
        history = role_history(repo)
        last = history[-1] if history else None
        if last is None and primary == cfg.primary.name:
            return (
                f"{primary} is the configured primary and no role change was ever recorded: nothing to record"
            )
        if last and last.primary == primary and set(demoted) <= set(last.demoted):
            return f"role history already says {primary} is the primary ({last.event} of {last.at:%H:%M:%S})"
        key = record_role_change(
            repo,
            RoleEvent(at=now(), event=event, primary=primary, demoted=demoted, timeline=timeline, lsn=lsn),
        )
    except DRError as exc:
        logger().warning("role change NOT recorded: %s", one_line(exc))
        return (
            f"NOT recorded ({one_line(exc)}): `gravl-dr guard` cannot know {', '.join(demoted)} was demoted"
        )
    return f"recorded {key}: {primary} primary, {', '.join(demoted)} demoted"


def _record(report: Any, tl: Timeline, outcome: str) -> None:
    tl.add("record-role-change", outcome)
    if outcome.startswith("NOT"):
        report.notes.append(f"role history: {outcome}")


# ------------------------------------------------------------------------------ the flow


UNFENCED = "complete-unfenced"  # promoted and validated, but the old primary could NOT be fenced
UNFENCED_EXIT_CODE = 3  # the CLI's exit status for it: a success nobody may read as a clean one


class FailoverReport(RunReport):
    planned: bool = False
    old_primary: str
    new_primary: str | None = None
    already_promoted: bool = False
    fence: str | None = None
    fenced: bool | None = None  # None: no fence step was needed (the old primary was down and fenced)
    warnings: list[str] = []
    reference_lsn: str | None = None
    promoted_lsn: str | None = None
    rto_seconds: float | None = None
    started_at: datetime | None = None


def failover_markdown(r: FailoverReport) -> str:
    title = {
        "complete": f"Failover complete: {r.new_primary} is the primary",
        UNFENCED: f"Failover complete, but {r.old_primary} is NOT fenced: {r.new_primary} is the "
        "primary — split-brain risk",
        "refused": "Failover refused: nothing was promoted",
        "failed": "Failover FAILED",
    }.get(r.status, f"Failover {r.status}")
    rows = [
        ("status", r.status),
        ("old primary", r.old_primary),
        ("new primary", r.new_primary or "-"),
        (
            "RTO (flow start to validated write)",
            f"{r.rto_seconds:.2f} s" if r.rto_seconds is not None else "-",
        ),
        (
            "RPO",
            f"{r.rpo_bytes} bytes of WAL ({human_bytes(r.rpo_bytes)})"
            if r.rpo_bytes is not None
            else "unknown (no WAL position of the old primary)",
        ),
        ("WAL reference / promoted at", f"{r.reference_lsn or '-'} / {r.promoted_lsn or '-'}"),
        ("fence", r.fence or "-"),
        *r.shared_rows(),
    ]
    warnings = section("WARNING", bullets(f"**{w}**" for w in r.warnings)) if r.warnings else []
    steps: list[str] = []
    if r.status == UNFENCED:
        steps.append(
            f"Make sure {r.old_primary} cannot come back as a primary: power it off or cut it "
            "from the network, or run `gravl-dr guard` before PostgreSQL starts on its host."
        )
    if r.status in ("complete", UNFENCED):
        steps.append(f"Repair {r.old_primary}, then run `gravl-dr failback` to make it the primary again.")
    elif r.status == "refused":
        steps.append(
            "Nothing changed. Read the reason above; re-run when the state allows it "
            "(`--force` only if you accept the risk it names)."
        )
    else:
        steps.append("Re-run `gravl-dr failover`: finished steps are detected and skipped.")
        if r.new_primary and r.promoted_lsn:
            steps.append(f"{r.new_primary} was promoted and stays the primary; fix what failed above.")
    return r.render(title, rows, steps, before=warnings)


def _finish(
    cfg: Config,
    report: Any,
    key: str,
    job: str,
    markdown: Callable[[Any], str],
    metrics: Mapping[str, float],
) -> None:
    publish_report(key, markdown(report), f"{job} of {cfg.cluster}")
    now = time.time()
    if report.status in ("complete", UNFENCED):
        metrics = {outcome_metric(job, "success"): now, **metrics}
    elif report.status == "failed":
        metrics = {outcome_metric(job, "failure"): now, **metrics}
    else:
        metrics = {outcome_metric(job, "refusal"): now}
    push_flow_metrics(cfg, job, metrics)


def failover_metrics(r: FailoverReport) -> dict[str, float]:
    out: dict[str, float] = {}
    if r.rto_seconds is not None:
        out["gravl_failover_rto_seconds"] = r.rto_seconds
    if r.rpo_bytes is not None:
        out["gravl_failover_rpo_bytes"] = float(r.rpo_bytes)
    if r.fenced is not None:
        out["gravl_failover_old_primary_unfenced"] = 0.0 if r.fenced else 1.0
    return out


@dataclass
class _Failover:
    """What every step of one failover plan needs."""

    cfg: Config
    report: FailoverReport
    tl: Timeline
    target: Node
    old: Node
    force: bool
    approved_by: str | None
    auto_approve: bool
    approval_timeout_seconds: int
    fenced_ahead: FenceResult | None = None
    dns_error: str | None = None


def _approve_step(r: _Failover, step: Step) -> None:
    record = approval_gate(
        what=f"promote {r.target.name} in place of {r.old.name}",
        plan_lines=r.report.plan,
        approved_by=r.approved_by,
        auto_approve=r.auto_approve,
        timeout_seconds=r.approval_timeout_seconds,
    )
    set_approval(r.report, record)
    r.tl.add("approve", f"approved by {r.report.approver}" + (" (auto_approve)" if r.auto_approve else ""))


def _fence_step(r: _Failover, step: Step) -> None:
    if r.fenced_ahead is not None and step.method == "stop":
        fence = r.fenced_ahead  # its worker fenced it in the run that observed it, as this plan says
        logger().info("%s: fenced by its worker while observing it: %s", r.old.name, fence.action)
    else:
        fence = fence_old_primary(r.cfg, r.old, step)
    r.report.fence, r.report.fenced = fence.action, fence.fenced
    r.tl.add("fence-old-primary", fence.action)
    if not fence.fenced:
        r.report.warnings.append(f"{r.old.name} could not be fenced: {fence.action}")


def _promote_step(r: _Failover, step: Step) -> None:
    promoted = promote_replica(r.cfg, r.target, r.old, r.force)
    r.report.promoted_lsn = promoted.promoted_lsn
    r.tl.add(
        "promote-replica",
        f"{r.target.name} promoted, timeline {promoted.timeline} from {promoted.promoted_lsn}"
        if not promoted.already_primary
        else f"{r.target.name} already primary",
    )
    outcome = record_role_change_task(
        r.cfg, "failover", r.target.name, [r.old.name], promoted.timeline, promoted.promoted_lsn
    )
    _record(r.report, r.tl, outcome)


def _dns_step(r: _Failover, step: Step) -> None:
    try:
        r.report.dns = switch_dns(r.cfg, [node_dns_value(r.old)], node_dns_value(r.target))
        r.tl.add("switch-dns", r.report.dns.detail)
    except DRError as exc:
        r.dns_error = f"DNS switch failed: {one_line(exc)}"
        r.tl.add("switch-dns", r.dns_error)


def _reconnect_step(r: _Failover, step: Step) -> None:
    if r.dns_error:
        r.tl.add("reconnect-apps", "skipped: DNS does not point at the new primary")
        return
    event = ReconnectEvent(
        cluster=r.cfg.cluster,
        event="failover",
        new_primary=r.target.name,
        old_primary=r.old.name,
        host=node_dns_value(r.target),
        dns_record=r.cfg.dns.record,
    )
    r.report.hooks = reconnect_apps(r.cfg, event)
    r.tl.add("reconnect-apps", f"{sum(h.ok for h in r.report.hooks)}/{len(r.report.hooks)} hook(s) ok")


def _validate_step(r: _Failover, step: Step) -> None:
    r.report.canary = validate_primary(r.target, f"failover {r.tl.started.isoformat()}")
    r.report.rto_seconds = round(r.tl.add("validate", f"canary write on {r.target.name} read back"), 3)


_FAILOVER_STEPS: dict[str, Callable[[_Failover, Step], None]] = {
    "approve": _approve_step,
    "fence-old-primary": _fence_step,
    "promote-replica": _promote_step,
    "switch-dns": _dns_step,
    "reconnect-apps": _reconnect_step,
    "validate": _validate_step,
}


@flow(name="failover", log_prints=False, on_running=[send_heartbeat])
def failover_flow(
    config_path: ConfigPath = None,
    max_lag_bytes: Annotated[
        int, Field(ge=0, description="refuse a replica further behind than this")
    ] = DEFAULT_MAX_LAG_BYTES,
    force: Annotated[
        bool,
        Field(
            description="promote even if the old primary accepts writes or the "
            "replica lags (it is fenced first)"
        ),
    ] = False,
    planned: Annotated[
        bool, Field(description="the primary is up on purpose (a drill): stop it cleanly, no data loss")
    ] = False,
    approved_by: OptionalText = None,
    auto_approve: Annotated[
        bool,
        Field(
            description="skip the approval form (shown in the report); a name in approved_by alone never does"
        ),
    ] = False,
    approval_timeout_seconds: Annotated[int, Field(ge=10, le=86400)] = 900,
) -> FailoverReport:
    """Fail over from the configured primary to the most advanced healthy replica.

    Args:
        config_path: The gravl-dr config file; empty: $GRAVL_DR_CONFIG of the worker, then
            gravl-dr.yaml in its working directory.
        max_lag_bytes: Refuse a replica further behind the old primary's last known WAL position.
        force: Go on although the old primary accepts writes (it is fenced first) or the replica lags.
        planned: The primary is up on purpose (a drill): stop it cleanly first, no data loss.
        approved_by: Who approves (a name or a ticket): pre-fills the approval form's approver;
            it does not skip the form.
        auto_approve: Skip the approval form; the report says so (the CLI sets it after --yes or
            an approval typed on the terminal).
        approval_timeout_seconds: How long the approval form waits before nothing is promoted.
    """
    tl = Timeline()
    cfg = load_config(config_path)
    nodes = resolve_nodes(cfg)
    check_dns_config(cfg.dns)
    key = report_key("failover", cfg.cluster)
    report = FailoverReport(
        cluster=cfg.cluster, old_primary=cfg.primary.name, planned=planned, started_at=tl.started
    )
    try:
        if not cfg.replicas:
            raise ConfigError("no replicas in the config: nothing to fail over to")
        # The replicas first: the primary's own worker gets their states with the planner's
        # other inputs, and fences it in the run that observes it when the plan would.
        replica_states = check_replica_health(cfg)
        ahead = FenceAhead(replicas=replica_states, max_lag_bytes=max_lag_bytes, force=force, planned=planned)
        primary_state, fenced_ahead = assess_primary(cfg, ahead)
        tl.add("assess-primary", primary_state.evidence())
        tl.add("check-replica-health", "; ".join(s.evidence() for s in replica_states))
        report.evidence = [primary_state.evidence(), *(s.evidence() for s in replica_states)]
        plan: FailoverPlan = plan_failover(
            primary_state, replica_states, max_lag_bytes=max_lag_bytes, force=force, planned=planned
        )
        report.plan = plan.step_lines()
        report.notes = list(plan.notes)
        report.new_primary, report.already_promoted = plan.target, plan.already_promoted
        report.reference_lsn = plan.reference_lsn
        tl.add(
            "plan",
            f"target {plan.target}"
            + (f", {plan.lag_bytes} bytes behind" if plan.lag_bytes is not None else "")
            + f": {', '.join(plan.kinds())}",
        )
        target, old = nodes[plan.target], nodes[plan.old_primary]
        run = _Failover(
            cfg,
            report,
            tl,
            target,
            old,
            force,
            approved_by,
            auto_approve,
            approval_timeout_seconds,
            fenced_ahead,
        )
        if fenced_ahead is not None and "fence-old-primary" not in plan.kinds():
            report.fence, report.fenced = fenced_ahead.action, fenced_ahead.fenced  # said, not lost
        for step in plan.steps:
            _FAILOVER_STEPS[step.kind](run, step)
        dns_error = run.dns_error
        if plan.already_promoted:
            already = promote_node(target)  # read-only: it is a primary
            report.promoted_lsn = report.promoted_lsn or already.promoted_lsn
            _record(
                report,
                tl,
                record_role_change_task(
                    cfg, "failover", target.name, [old.name], already.timeline, already.promoted_lsn
                ),
            )
        report.rpo_bytes = rpo_bytes(report.reference_lsn, report.promoted_lsn)
        failed_hooks = [h for h in report.hooks if not h.ok]
        problems = ([dns_error] if dns_error else []) + [
            f"reconnect hook {h.kind} {h.target} failed: {h.message}" for h in failed_hooks
        ]
        if problems:
            raise ReconnectFailed("; ".join(problems) + f" — the promotion of {target.name} stands")
        report.status = UNFENCED if report.fenced is False else "complete"
        tl.add(
            "report",
            f"RTO {report.rto_seconds:.2f}s, RPO {report.rpo_bytes} bytes"
            + (f"; WARNING: {old.name} NOT fenced" if report.fenced is False else ""),
        )
    except Refused as exc:
        report.status, report.error = "refused", one_line(exc)
        tl.add("refused", report.error)
        report.timeline = tl.events
        _finish(cfg, report, key, "failover", failover_markdown, {})
        raise
    except BaseException as exc:
        report.status, report.error = "failed", one_line(exc)
        if report.rpo_bytes is None:
            report.rpo_bytes = rpo_bytes(report.reference_lsn, report.promoted_lsn)
        tl.add("failed", report.error)
        report.timeline = tl.events
        _finish(cfg, report, key, "failover", failover_markdown, failover_metrics(report))
        raise
    report.timeline = tl.events
    _finish(cfg, report, key, "failover", failover_markdown, failover_metrics(report))
    if report.status == UNFENCED:
        # A COMPLETED state of its own name: the UI and the API show the warning, not a plain success.
        return Completed(
            name="CompletedUnfenced",  # type: ignore[return-value]
            message=f"{report.new_primary} promoted, but {report.old_primary} is NOT fenced",
            data=report,
        )
    return report
