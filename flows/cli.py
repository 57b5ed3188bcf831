"""Orchestration: the ``gravl-dr`` command line.

Commands that are not flows (list, verify, wal-push, wal-fetch) never import Prefect: PostgreSQL
calls the WAL hooks once per file and `list` must answer at once. Each feature registers its
commands from its own ``flows/cli_*.py`` module; every error ends as one line and a non-zero exit.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

from flows.prefect_env import apply_prefect_defaults
from tasks.errors import DRError, one_line

T = TypeVar("T")

# Modules that add sub-commands (each has ``register(subparsers)``), in help order.
COMMAND_MODULES = [
    "flows.cli_backup",
    "flows.cli_demo",
    "flows.cli_retention",
    "flows.cli_lock",
    "flows.cli_wal",
    "flows.cli_drill",
    "flows.cli_failover",
    "flows.cli_guard",
]

# Commands PostgreSQL runs once per WAL file may answer before the parser and the config model
# load (each module has ``fast_path(argv) -> int | None``; None falls through to the parser).
FAST_PATHS = {"wal-push": "flows.cli_wal", "wal-fetch": "flows.cli_wal"}

log = logging.getLogger("gravl_dr")


def prefect_environment() -> None:
    """Settings for flows run from the CLI; set before Prefect is imported (see STACK.md)."""
    apply_prefect_defaults()


class _NoTraceback(logging.Filter):
    """Keep tracebacks out of the terminal (they still reach the Prefect API and UI)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info = None
        record.exc_text = None
        return True


def quiet_console_tracebacks() -> None:
    if os.environ.get("GRAVL_DR_DEBUG"):
        return
    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs", ""):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.addFilter(_NoTraceback())


class Terminated(SystemExit):
    """SIGTERM, as an exception: the flow's own clean-up and the interpreter's exit handlers run."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated(128 + signum)


def run_flow(flow_fn: Callable[..., T], **params: Any) -> T:
    """Run a flow in-process: against PREFECT_API_URL when set, else Prefect's ephemeral mode.

    SIGTERM (a supervisor or Kubernetes stopping us) becomes an exception, not a silent death:
    the flow tears down what it started (a drill's server), and the exit handlers stop
    Prefect's ephemeral API server, which would otherwise live on as an orphan."""
    prefect_environment()
    signal.signal(signal.SIGTERM, _on_sigterm)
    root = logging.getLogger()
    for handler in list(root.handlers):  # Prefect prints flow and task logs itself
        root.removeHandler(handler)
    import prefect  # noqa: F401 - configures logging

    quiet_console_tracebacks()
    return flow_fn(**params)


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
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    code = _main(argv)
    if argv is None and "prefect" in sys.modules:
        _exit_without_teardown(code)
    return code


def _exit_without_teardown(code: int) -> NoReturn:
    """End a flow command as the interpreter would — other threads joined, every exit handler run
    (Prefect flushes its logs and events to the API, stops an ephemeral server) — but skip the
    teardown of the thousands of modules Prefect, pydantic and friends loaded: freeing them
    took longer than the flow run's own bookkeeping (seconds on a busy machine), on every
    command, after the work was done."""
    import atexit
    import threading

    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # noqa: SLF001 - the one way to run the exit handlers before os._exit
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    fast = next((FAST_PATHS[w] for w in words if w in FAST_PATHS), None)
    if fast is not None:
        code = importlib.import_module(fast).fast_path(words)
        if code is not None:
            return int(code)
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


if __name__ == "__main__":
    sys.exit(main())
