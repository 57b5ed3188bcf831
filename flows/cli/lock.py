"""Entry point: the CLI command ``gravl-dr unlock`` — remove a stale repository lock."""

from __future__ import annotations

import argparse
from typing import Any

from tasks.config import load_config


def register(sub: Any) -> None:
    p = sub.add_parser(
        "unlock",
        help="remove the repository's backup lock when its holder is gone (a host that died)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="also remove a lock held from another host (whose process cannot be checked "
        "from here); never one whose process runs on this host",
    )
    p.set_defaults(func=cmd_unlock)


def cmd_unlock(args: argparse.Namespace) -> int:
    from tasks.backup import break_lock
    from tasks.repository import open_repository

    cfg = load_config(args.config)
    repo = open_repository(cfg.repository)
    repo.check()
    print(break_lock(repo, force=args.force))
    return 0
