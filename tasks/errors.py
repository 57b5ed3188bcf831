"""Pure logic: the error hierarchy that drives retries and CLI exit codes.

Transient errors (storage unavailable, timeouts, refused connections) may be retried;
permanent ones (checksum mismatch, failed precondition, bad input) never are.
"""

from __future__ import annotations

from typing import Any


class DRError(Exception):
    """Root of every error gravl-dr raises on purpose; its message is one line for an operator."""

    exit_code = 1


class TransientError(DRError):
    """Something outside us may recover by itself: retrying can help."""


class PermanentError(DRError):
    """Retrying cannot help: the input, the data or the state is wrong."""


class ConfigError(PermanentError):
    """The configuration file or a command-line argument is invalid."""

    exit_code = 2


class PreconditionFailed(PermanentError):
    """The world is not in the state this step needs (non-empty target, server down...)."""


class NotFound(PermanentError):
    """An object, backup or segment does not exist."""


class AlreadyExists(PermanentError):
    """An object exists already and gravl-dr never overwrites."""


class ChecksumMismatch(PermanentError):
    """Stored bytes do not match the recorded SHA-256 or size."""


class CommandFailed(DRError):
    """A subprocess exited non-zero; carries the tail of its stderr."""


class StorageUnavailable(TransientError):
    """The repository could not be reached or answered with a server error."""


class Locked(TransientError):
    """Another run holds the cluster's repository lock."""


def is_transient(exc: BaseException | None) -> bool:
    """True when an exception (or its cause chain) is worth a retry."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, TransientError):
            return True
        if isinstance(exc, DRError):
            return False
        if isinstance(exc, TimeoutError | ConnectionError):
            return True
        exc = exc.__cause__
        seen += 1
    return False


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry a task only when it failed transiently."""
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - we classify, not handle
        return is_transient(exc)
    return False


def one_line(exc: BaseException) -> str:
    """An error as one line, for the CLI and for reports."""
    text = str(exc).strip().replace("\n", " | ") or type(exc).__name__
    return text if len(text) <= 600 else text[:597] + "..."
