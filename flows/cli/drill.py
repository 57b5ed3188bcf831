"""Entry point: the ``gravl-dr drill`` command — run the restore drill flow and print its verdict."""

from __future__ import annotations

import argparse
from typing import Any

from flows.cli.runner import run_flow
from tasks.config import load_config
from tasks.models import check_backup_ref


def register(sub: Any) -> None:
    p = sub.add_parser("drill", help="restore a backup into a throwaway instance and prove it (a flow run)")
    p.add_argument("backup", nargs="?", default="latest", help="backup id or 'latest' (default)")
    p.add_argument(
        "--target-time",
        metavar="TS",
        help="replay WAL to this time (ISO 8601; UTC when no offset) instead of the archive's end",
    )
    p.add_argument(
        "--kind",
        choices=["physical", "logical"],
        default="physical",
        help="which kind of backup 'latest' means (default physical: WAL replay, page checksums)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_drill)


def cmd_drill(args: argparse.Namespace) -> int:
    from tasks.recovery import parse_target_time
    from tasks.repository import open_repository

    # Validate first, before Prefect starts: the reference, the time, the config, the repository.
    check_backup_ref(args.backup)
    target_time = parse_target_time(args.target_time) if args.target_time else None
    cfg = load_config(args.config)
    open_repository(cfg.repository).check()
    from flows.drill import drill_flow

    report = run_flow(
        drill_flow, config_path=args.config, backup=args.backup, target_time=target_time, kind=args.kind
    )
    if args.json:
        print(report.model_dump_json(indent=2))
        return 0
    rpo = f"{report.rpo_seconds:.0f}s" if report.rpo_seconds is not None else "-"
    if report.selection:
        print(f"drilled {report.backup_id}: {report.selection}")
    print(
        f"{report.verdict()}; backup {report.backup_id}, RTO {report.rto_seconds or 0:.1f}s "
        f"(restore {report.restore_seconds:.1f}s + recovery {report.recovery_seconds:.1f}s), "
        f"data age {rpo}; report {report.report_keys[-1] if report.report_keys else '-'}"
    )
    return 0
