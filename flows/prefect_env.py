"""Orchestration setup: the Prefect environment defaults, in one place, applied before Prefect is imported.

The CLI and the test suite both call ``apply_prefect_defaults`` first thing (STACK.md): no
telemetry, a patient ephemeral API server, our loggers shipped to Prefect, no UI. An operator's
own environment wins (``setdefault``). This module must not import Prefect.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

PREFECT_DEFAULTS: dict[str, str] = {
    "PREFECT_LOGGING_EXTRA_LOGGERS": "tasks,flows",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "PREFECT_UI_ENABLED": "false",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    # Without PREFECT_API_URL a command starts Prefect's temporary API server as a subprocess
    # writing to the command's own stderr, and stops it at exit; a service of that server cut
    # off mid-flush by the stop logs an ERROR with a traceback there ("Error flushing 1 events"),
    # after the command's own one-line result. Only its fatal errors reach the terminal; what
    # matters to the command fails in the command's own API calls.
    "PREFECT_SERVER_LOGGING_LEVEL": "CRITICAL",
}


def apply_prefect_defaults(env: MutableMapping[str, str] = os.environ) -> None:
    """Set each default the environment does not already set."""
    for name, value in PREFECT_DEFAULTS.items():
        env.setdefault(name, value)
