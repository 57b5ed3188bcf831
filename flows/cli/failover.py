"""Entry point: CLI commands for failover, failback and the failover drill.

Approval: ``--yes`` skips it; on a terminal the plan is shown and the operator types ``yes``
before any flow starts (Ctrl-C there ends the command, exit 130, also when it was started with
SIGINT ignored); otherwise the flow pauses for the Prefect UI's approval form, which
needs a Prefect server (``PREFECT_API_URL``) someone can open.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Callable
from typing import Any

from flows.cli.runner import ctrl_c_interrupts, run_flow
from tasks.config import Config, load_config
from tasks.errors import PreconditionFailed
from tasks.failover import DEFAULT_MAX_LAG_BYTES, Refused


def register(sub: Any) -> None:
    p = sub.add_parser("failover", help="promote the most advanced healthy replica (a flow run)")
    p.add_argument("--yes", action="store_true", help="do not ask for approval")
    p.add_argument(
        "--max-lag-bytes",
        type=int,
        default=DEFAULT_MAX_LAG_BYTES,
        metavar="N",
        help=f"refuse a replica further behind than N bytes (default {DEFAULT_MAX_LAG_BYTES})",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="go on although the old primary accepts writes (it is fenced) or the replica lags",
    )
    p.add_argument(
        "--planned",
        action="store_true",
        help="the primary is up on purpose: stop it cleanly first (no data loss)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_failover)

    p = sub.add_parser("failback", help="make the configured primary the primary again (a flow run)")
    p.add_argument("--yes", action="store_true", help="do not ask for approval")
    p.add_argument("--no-backup", action="store_true", help="skip the backup of the current primary")
    p.add_argument(
        "--discard-old-data",
        action="store_true",
        help="delete the old primary's data directory / un-replicated WAL once it is rebuilt "
        "(default: keep it next to its pgdata and report where)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_failback)

    p = sub.add_parser("drill-failover", help="planned failover then failback, reported together")
    p.add_argument("--yes", action="store_true", help="do not ask for approval")
    p.add_argument("--backup", action="store_true", help="back up before failing back")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_drill)


def _preflight(args: argparse.Namespace) -> Config:
    """Validate first: config and DNS settings, before Prefect starts."""
    from tasks.dns_switch import check_dns_config

    cfg = load_config(args.config)
    check_dns_config(cfg.dns)
    return cfg


def _ask(lines: Callable[[], list[str]], question: str) -> str | None:
    """Terminal approval; None means: let the flow pause for the UI (or skip with --yes)."""
    if sys.stdin.isatty():
        with ctrl_c_interrupts():  # the operator's Ctrl-C ends the command, however it was started
            print("\n".join(lines()))
            answer = input(f"{question} Type 'yes' to go on: ").strip().lower()
        if answer != "yes":
            raise Refused("not approved on the terminal: nothing changed")
        return f"{getpass.getuser()} (terminal)"
    if os.environ.get("PREFECT_API_URL"):
        return None
    raise PreconditionFailed(
        "approval needed: run it on a terminal, pass --yes, or set PREFECT_API_URL "
        "and approve the paused run in the Prefect UI"
    )


def _failover_preview(cfg: Config, args: argparse.Namespace) -> list[str]:
    """The flow's own observation and plan (tasks.topology, tasks.failover), shown before approval."""
    from tasks.failover import plan_failover
    from tasks.topology import observe_primary, observe_replicas

    plan = plan_failover(
        observe_primary(cfg),
        observe_replicas(cfg),
        max_lag_bytes=args.max_lag_bytes,
        force=args.force,
        planned=args.planned,
    )
    return plan.preview()


def _skipped() -> str:
    """--yes: recorded as the approver, so the flow does not pause for the approval form."""
    import getpass

    return f"--yes ({getpass.getuser()})"


def cmd_failover(args: argparse.Namespace) -> int:
    cfg = _preflight(args)
    approved_by = _skipped() if args.yes else _ask(lambda: _failover_preview(cfg, args), "Fail over?")
    from flows.failover import failover_flow

    report = run_flow(
        failover_flow,
        config_path=args.config,
        max_lag_bytes=args.max_lag_bytes,
        force=args.force,
        planned=args.planned,
        approved_by=approved_by,
        auto_approve=approved_by is not None,
    )
    from flows.failover import UNFENCED, UNFENCED_EXIT_CODE

    if args.json:
        print(report.model_dump_json(indent=2))
    else:
        rpo = f"{report.rpo_bytes} bytes" if report.rpo_bytes is not None else "unknown"
        dns = f"; DNS {report.dns.detail}" if report.dns and report.dns.record else ""
        done = "failover complete" if report.status != UNFENCED else "failover complete WITH A WARNING"
        print(
            f"{done}: {report.new_primary} is the primary (was {report.old_primary}); "
            f"RTO {report.rto_seconds:.2f}s, RPO {rpo}{dns}"
        )
    if report.status == UNFENCED:
        for warning in report.warnings:
            sys.stderr.write(f"gravl-dr: WARNING: {warning}\n")
        sys.stderr.write(
            f"gravl-dr: WARNING: {report.old_primary} is NOT fenced — split-brain risk; "
            f"exit status {UNFENCED_EXIT_CODE}\n"
        )
        return UNFENCED_EXIT_CODE
    return 0


def cmd_failback(args: argparse.Namespace) -> int:
    cfg = _preflight(args)
    approved_by = (
        _skipped()
        if args.yes
        else _ask(
            lambda: [
                f"Failback: {cfg.primary.name} becomes the primary again (controlled switchover; writes pause "
                "for a few seconds)."
            ],
            "Fail back?",
        )
    )
    from flows.failback import failback_flow

    report = run_flow(
        failback_flow,
        config_path=args.config,
        backup=not args.no_backup,
        approved_by=approved_by,
        auto_approve=approved_by is not None,
        discard_old_data=args.discard_old_data,
    )
    if args.json:
        print(report.model_dump_json(indent=2))
    else:
        window = (
            f"; writes unavailable {report.switchover.unavailable_seconds:.2f}s" if report.switchover else ""
        )
        print(f"failback complete: {report.home} is the primary again{window}")
        if report.old_data:
            print(
                f"kept (un-replicated data of {report.home}, LSN {report.fork_lsn}..{report.end_lsn} on timeline "
                f"{report.diverged_timeline}): {', '.join(report.old_data)}"
            )
    return 0


def cmd_drill(args: argparse.Namespace) -> int:
    cfg = _preflight(args)
    approved_by = (
        _skipped()
        if args.yes
        else _ask(
            lambda: [
                f"Drill: {cfg.primary.name} is stopped cleanly, a replica is promoted, then "
                f"{cfg.primary.name} is made the primary again."
            ],
            "Run the drill?",
        )
    )
    from flows.drill_failover import drill_failover_flow

    report = run_flow(
        drill_failover_flow,
        config_path=args.config,
        backup=args.backup,
        approved_by=approved_by,
        auto_approve=approved_by is not None,
    )
    if args.json:
        print(report.model_dump_json(indent=2))
    else:
        fo, fb = report.failover, report.failback
        window = f"{fb.switchover.unavailable_seconds:.2f}s" if fb.switchover else "-"
        print(
            f"failover drill passed: failover RTO {fo.rto_seconds:.2f}s, RPO {fo.rpo_bytes} bytes; "
            f"failback write unavailability {window}"
        )
    return 0
