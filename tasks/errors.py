"""Pure logic: the error hierarchy that drives retries and CLI exit codes.

Transient errors (storage unavailable, timeouts, refused connections) may be retried;
permanent ones (checksum mismatch, failed precondition, bad input) never are.
"""

from __future__ import annotations

from typing import Any, Literal


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
    """A subprocess failed; carries the tail of its stderr. Never raised itself: ``command_error``
    picks one of its two leaves below, so every failure is transient or permanent."""


class CommandRejected(CommandFailed, PermanentError):
    """A subprocess exited non-zero for a reason retrying cannot fix (bad input, a refusal)."""


class CommandInterrupted(CommandFailed, TransientError):
    """A subprocess timed out or could not reach its server: a retry may succeed."""


class StorageUnavailable(TransientError):
    """The repository could not be reached or answered with a server error."""


class Locked(TransientError):
    """Another run holds the cluster's repository lock."""


class InternalError(PermanentError):
    """A bug in gravl-dr (an unexpected Python exception), not a fault of the outside world."""


# ---------------------------------------------------------------- classification tables
#
# Every error belongs to exactly one class. A table names each S3 / Route 53 error code we know;
# an unknown code falls back on its HTTP status (5xx, 429 and 408 transient; other 4xx
# permanent). Codes: the S3 API reference "Error responses" list and the Route 53 API reference
# "Common errors" list.

AwsKind = Literal["transient", "not_found", "exists", "denied", "no_bucket", "refused"]

AWS_CODES: dict[str, AwsKind] = {
    # throttling, timeouts, server trouble, credentials that expire and refresh (instance roles)
    "SlowDown": "transient",
    "RequestTimeout": "transient",
    "InternalError": "transient",
    "ServiceUnavailable": "transient",
    "Throttling": "transient",
    "ThrottlingException": "transient",
    "TooManyRequests": "transient",
    "TooManyRequestsException": "transient",
    "RequestLimitExceeded": "transient",
    "ExpiredToken": "transient",
    "ExpiredTokenException": "transient",
    "RequestExpired": "transient",
    "RequestTimeTooSkewed": "transient",
    "OperationAborted": "transient",
    "ConditionalRequestConflict": "transient",  # S3 409: a concurrent write; retry decides
    "BadDigest": "transient",
    "XAmzContentSHA256Mismatch": "transient",  # corrupted in transit
    "PriorRequestNotComplete": "transient",  # Route 53: one change at a time per zone
    "ServiceUnavailableException": "transient",
    "InternalFailure": "transient",
    "503": "transient",
    "500": "transient",
    # absent
    "NoSuchKey": "not_found",
    "404": "not_found",
    "NotFound": "not_found",
    "NoSuchUpload": "not_found",
    "NoSuchBucket": "no_bucket",
    "NoSuchHostedZone": "no_bucket",
    # put-if-absent lost: the object exists
    "PreconditionFailed": "exists",
    "412": "exists",
    # credentials and permissions that retrying cannot fix
    "AccessDenied": "denied",
    "AccessDeniedException": "denied",
    "403": "denied",
    "InvalidAccessKeyId": "denied",
    "SignatureDoesNotMatch": "denied",
    "InvalidClientTokenId": "denied",
    "UnrecognizedClientException": "denied",
    "AllAccessDisabled": "denied",
    "AccountProblem": "denied",
    "InvalidToken": "denied",
    "KMS.AccessDeniedException": "denied",
    "KMS.DisabledException": "denied",
    "KMS.NotFoundException": "denied",
    # requests the service will never accept as sent
    "InvalidRequest": "refused",
    "InvalidArgument": "refused",
    "InvalidBucketName": "refused",
    "EntityTooLarge": "refused",
    "EntityTooSmall": "refused",
    "InvalidPart": "refused",
    "InvalidPartOrder": "refused",
    "InvalidObjectState": "refused",
    "InvalidStorageClass": "refused",
    "MalformedXML": "refused",
    "MethodNotAllowed": "refused",
    "MissingContentLength": "refused",
    "NotImplemented": "refused",
    "InvalidRange": "refused",
    "KeyTooLongError": "refused",
    "InvalidInput": "refused",
    "InvalidChangeBatch": "refused",
    "InvalidDomainName": "refused",
    "ValidationError": "refused",
}


def classify_aws(code: str, status: int) -> AwsKind:
    """The kind of an S3 or Route 53 error from its code, else from its HTTP status."""
    kind = AWS_CODES.get(code)
    if kind is not None:
        return kind
    if status >= 500 or status in (408, 429):
        return "transient"
    if status == 404:
        return "not_found"
    if status == 412:
        return "exists"
    if status in (401, 403):
        return "denied"
    return "refused"


# botocore's own (client-side) errors that retrying cannot fix; every other BotoCoreError is
# about the connection (refused, reset, timed out, a proxy, a checksum of a reply) and transient.
BOTOCORE_PERMANENT = frozenset(
    {
        "NoCredentialsError",
        "PartialCredentialsError",
        "NoRegionError",
        "ParamValidationError",
        "UnknownServiceError",
        "ProfileNotFound",
        "InvalidRegionError",
        "InvalidS3AddressingStyleError",
        "UnknownSignatureVersionError",
        "ConfigNotFound",
        "InvalidConfigError",
        "DataNotFoundError",
        "UnknownCredentialError",
        "InvalidEndpointConfigurationError",
        "MissingParametersError",
        "ValidationError",
        "UnsupportedSignatureVersionError",
    }
)


def botocore_transient(exc: BaseException) -> bool:
    """For a botocore exception that is not a service reply (a BotoCoreError): is it transient?"""
    return not any(cls.__name__ in BOTOCORE_PERMANENT for cls in type(exc).__mro__)


# pg_basebackup, pg_dump, pg_restore, psql, pg_ctl: stderr that says the server could not be
# reached (libpq's fe-connect.c messages) rather than that it refused what we asked.
_UNREACHABLE = (
    "could not connect to server",
    "connection to server at",
    "connection refused",
    "could not translate host name",
    "timeout expired",
    "server closed the connection unexpectedly",
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "no route to host",
    "network is unreachable",
    "could not receive data from server",
    "ssl syscall error",
    "connection timed out",
    "sorry, too many clients already",
    "remaining connection slots are reserved",
)
# ... except when libpq got an answer that says no to us (a login refused is not transient)
_REFUSED = (
    "password authentication failed",
    "no pg_hba.conf entry",
    "does not exist",
    "permission denied",
    "authentication failed",
)


def login_refused(message: str) -> bool:
    """True when libpq's message says a server answered and refused this login for good (a
    wrong password, a pg_hba reject, a missing role or database): retrying cannot help."""
    low = message.lower()
    return any(m in low for m in _REFUSED)


def command_error(message: str, *, timed_out: bool = False) -> CommandFailed:
    """A subprocess failure in its class: a timeout or an unreachable server is transient,
    anything else (including a refused login) permanent."""
    low = message.lower()
    if timed_out:
        return CommandInterrupted(message)
    if any(m in low for m in _UNREACHABLE) and not any(m in low for m in _REFUSED):
        return CommandInterrupted(message)
    return CommandRejected(message)


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
