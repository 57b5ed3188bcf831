"""Entry point: the ``gravl-dr`` command line in-process — the parser, the commands, the error contract.

Commands that are not flows (list, verify, guard, unlock, wal-push, wal-fetch) never import
Prefect: PostgreSQL calls the WAL hooks once per file and `list` must answer at once. Each
feature registers its commands from its own module of this package, imported here statically;
every error ends as one line and a non-zero exit.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from typing import NoReturn

from flows.cli import backup, demo, drill, failover, guard, lock, retention, wal, warmserver
from flows.cli.runner import Terminated, exit_without_teardown
from tasks.errors import DRError, one_line

# Modules that add sub-commands (each has ``register(subparsers)``), in help order.
COMMAND_MODULES = (backup, demo, retention, lock, wal, drill, failover, guard)

log = logging.getLogger("gravl_dr")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2
        sys.stderr.write(f"gravl-dr: error: {message}\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gravl-dr", description="Disaster recovery for PostgreSQL.")
    parser.add_argument("--config", help="config file (default $GRAVL_DR_CONFIG, then ./gravl-dr.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for module in COMMAND_MODULES:
        module.register(sub)
    warmserver.register(sub, run)  # the warm process runs each command it is handed as `run` does
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command in this process; a flow command (``argv`` None: the real command line)
    ends without the interpreter's module teardown."""
    code = run(argv)
    if argv is None and "prefect" in sys.modules:
        exit_without_teardown(code)
    return code


def run(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="gravl-dr: %(message)s",
    )
    try:
        code = int(args.func(args) or 0)
    except DRError as exc:
        if os.environ.get("GRAVL_DR_DEBUG"):
            traceback.print_exc()
        sys.stderr.write(f"gravl-dr: error: {one_line(exc)}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("gravl-dr: interrupted\n")
        return 130
    except Terminated as exc:
        sys.stderr.write("gravl-dr: terminated (SIGTERM)\n")
        return int(exc.code or 143)
    except Exception as exc:  # noqa: BLE001 - the CLI contract: one line, never a traceback
        if os.environ.get("GRAVL_DR_DEBUG"):
            traceback.print_exc()
        sys.stderr.write(f"gravl-dr: error: unexpected {type(exc).__name__}: {one_line(exc)}\n")
        return 1
    return code
