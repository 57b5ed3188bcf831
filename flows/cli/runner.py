"""Entry point support: run a flow in-process for a CLI command, and end the process quickly.

Every command module imports ``run_flow`` from here (statically); nothing here imports Prefect
until a flow actually runs, so commands that are not flows stay fast.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar

from flows.prefect_env import apply_prefect_defaults

T = TypeVar("T")

# Prefect's flow-run heartbeat thread sleeps in one-second steps and every flow run joins it at
# its end: up to a second of each flow command. A CLI command therefore runs its flow with
# Prefect's heartbeat off and sends the same heartbeat events itself (flows.heartbeat), from
# a thread that stops at once. Off (per command): no heartbeat at all, so a command killed with
# -9 leaves its run Running instead of letting a zombie-run automation mark it Crashed.
# Deployment runs (the worker) keep Prefect's own.
HEARTBEAT_ENV = "GRAVL_DR_FLOW_HEARTBEAT"


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


@contextlib.contextmanager
def ctrl_c_interrupts() -> Iterator[None]:
    """While the operator is asked a question on the terminal, Ctrl-C (SIGINT) raises
    KeyboardInterrupt — also in a process started with SIGINT ignored, as a script's background
    job or a CI runner's step is (Python then installs no handler, and the prompt would wait
    forever): Ctrl-C is the operator's way out of the question. The previous disposition is back
    afterwards."""
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if previous is not None:  # None: set outside Python, nothing to put back
            signal.signal(signal.SIGINT, previous)


def run_flow(flow_fn: Callable[..., T], /, **params: Any) -> T:
    """Run a flow in-process: against PREFECT_API_URL when set, else Prefect's ephemeral mode.

    SIGTERM (a supervisor or Kubernetes stopping us) becomes an exception, not a silent death:
    the flow tears down what it started (a drill's server), and the exit handlers stop
    Prefect's ephemeral API server, which would otherwise live on as an orphan.

    The run's heartbeat, and that of every flow it runs inside it, comes from
    :mod:`flows.heartbeat`, not from Prefect's engine (see HEARTBEAT_ENV above)."""
    prefect_environment()
    signal.signal(signal.SIGTERM, _on_sigterm)
    import prefect.logging.configuration

    # Importing Prefect configured its logging (the command imported the flow's module after
    # its own logging.basicConfig). In a child of the warm process Prefect was imported before
    # the fork and its logging is configured now, with the same handlers present, the same way.
    prefect.logging.configuration.ensure_logging_setup()
    root = logging.getLogger()
    for handler in list(root.handlers):  # Prefect prints flow and task logs itself
        root.removeHandler(handler)
    quiet_console_tracebacks()
    off = os.environ.get(HEARTBEAT_ENV, "").lower() in ("off", "0", "false", "no")
    import prefect.context

    current = prefect.context.get_settings_context()
    seconds = None if off else current.settings.flows.heartbeat_frequency
    # the same settings with Prefect's heartbeat off: a copy, not temporary_settings, which
    # validates every setting again from its sources (about 20 ms of each command)
    flows_settings = current.settings.flows.model_copy(update={"heartbeat_frequency": None})
    quiet = current.settings.model_copy(update={"flows": flows_settings})
    with prefect.context.SettingsContext(profile=current.profile, settings=quiet):
        if seconds is None:
            return flow_fn(**params)
        from flows.heartbeat import cli_heartbeat

        with cli_heartbeat(seconds):
            return flow_fn(**params)


def exit_without_teardown(code: int) -> NoReturn:
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
