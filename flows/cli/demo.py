"""Entry point: `gravl-dr demo` on the command line."""

from __future__ import annotations

import argparse
import time
from typing import Any

from flows.cli.runner import run_flow


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="back up and restore a throwaway Gravl database (embedded defaults)")
    p.add_argument("--users", type=int, default=500)
    p.add_argument("--logs", type=int, default=20000)
    p.add_argument("--keep", action="store_true", help="keep the clusters and repository")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from flows.demo import demo_flow, summary

    t0 = time.monotonic()
    report = run_flow(demo_flow, users=args.users, logs=args.logs, keep=args.keep)
    print(summary(report, time.monotonic() - t0))
    return 0 if report.ok else 1
