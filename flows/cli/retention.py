"""Entry point: the CLI command for retention — ``gravl-dr expire [--dry-run]``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from flows.cli.runner import run_flow
from tasks.config import load_config


def register(sub: Any) -> None:
    p = sub.add_parser("expire", help="delete backups and WAL beyond the retention policy (a flow run)")
    p.add_argument("--dry-run", action="store_true", help="show what would be deleted, delete nothing")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_expire)


def cmd_expire(args: argparse.Namespace) -> int:
    from tasks.repository import open_repository

    cfg = load_config(args.config)
    open_repository(cfg.repository).check()  # fail fast, before Prefect starts
    from flows.retention import expire_flow

    report = run_flow(expire_flow, config_path=args.config, dry_run=args.dry_run)
    if args.json:
        print(report.model_dump_json(indent=2))
    else:
        verb = "would expire" if args.dry_run else "expired"
        print(
            f"{verb} {len(report.expired)} backup(s) and {report.wal_expired} WAL file(s); "
            f"kept {len(report.kept)} backup(s) and {report.wal_kept} WAL file(s)"
        )
        for backup_id in report.expired:
            print(f"  {backup_id}")
        if report.leftovers:
            verb = "would free" if args.dry_run else "freed"
            print(
                f"{verb} {report.leftover_bytes} byte(s) in {len(report.leftovers)} leftover(s) "
                "of killed or failed runs:"
            )
            for item in report.leftovers:
                print(f"  {item}")
        for note in report.notes:
            print(f"  note: {note}")
    bad = {**report.broken, **report.invalid}
    if bad:
        # Loud: retention did its safe part, but backups the operator may count on are not there.
        print(
            f"gravl-dr: error: {len(bad)} backup(s) cannot be restored and were not counted "
            "toward retention.min_full: " + "; ".join(f"{b} ({why})" for b, why in sorted(bad.items())),
            file=sys.stderr,
        )
        return 1
    return 0
