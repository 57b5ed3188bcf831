"""Error classification (issue 9 item 13): every error is transient or permanent, exactly one;
S3 and Route 53 codes are classified by an explicit table; a bug is never "unreachable".
Plain functions, no services (the unit tier, by conftest's rule), but for two marked tests
that run a real process."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest
from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ParamValidationError,
    ReadTimeoutError,
)

import flows
import tasks
from tasks.config import RepositoryConfig
from tasks.errors import (
    AWS_CODES,
    CommandFailed,
    CommandInterrupted,
    CommandRejected,
    DRError,
    InternalError,
    PermanentError,
    TransientError,
    classify_aws,
    command_error,
    is_transient,
)
from tasks.pgcluster import LocalCluster
from tasks.repository import S3Repository

ROOT = Path(__file__).resolve().parent.parent


def _all_modules() -> None:
    for pkg in (tasks, flows):
        for info in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + "."):
            importlib.import_module(info.name)


def _subclasses(cls: type) -> set[type]:
    out: set[type] = set()
    sub: type
    for sub in cls.__subclasses__():
        out |= {sub} | _subclasses(sub)
    return out


def test_every_error_class_is_transient_or_permanent_exactly_one() -> None:
    _all_modules()
    from tasks.postgres import ServerUnreachable

    abstract = {TransientError, PermanentError, CommandFailed, ServerUnreachable}
    for cls in _subclasses(DRError) - abstract:
        if not cls.__module__.startswith(("tasks.", "flows.")):
            continue
        kinds = [issubclass(cls, TransientError), issubclass(cls, PermanentError)]
        assert kinds.count(True) == 1, f"{cls.__module__}.{cls.__name__} is in {kinds.count(True)} classes"


def test_no_code_raises_an_unclassified_error() -> None:
    # DRError and CommandFailed are roots: raising them directly would be in neither class
    offenders = []
    for path in [*ROOT.glob("tasks/*.py"), *ROOT.glob("flows/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                func = node.exc.func
                name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
                if name in ("DRError", "CommandFailed", "ServerUnreachable"):
                    offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []


S3_TABLE = [
    # (code, status, kind)
    ("SlowDown", 503, "transient"),
    ("SlowDown", 0, "transient"),
    ("RequestTimeout", 400, "transient"),
    ("ExpiredToken", 400, "transient"),
    ("ExpiredToken", 403, "transient"),
    ("TooManyRequests", 429, "transient"),
    ("", 429, "transient"),
    ("SomethingNew", 429, "transient"),
    ("", 408, "transient"),
    ("InternalError", 500, "transient"),
    ("SomethingNew", 502, "transient"),
    ("ServiceUnavailable", 503, "transient"),
    ("OperationAborted", 409, "transient"),
    ("ConditionalRequestConflict", 409, "transient"),
    ("BadDigest", 400, "transient"),
    ("RequestTimeTooSkewed", 403, "transient"),
    ("AccessDenied", 403, "denied"),
    ("InvalidAccessKeyId", 403, "denied"),
    ("SignatureDoesNotMatch", 403, "denied"),
    ("KMS.AccessDeniedException", 400, "denied"),
    ("", 403, "denied"),
    ("NoSuchBucket", 404, "no_bucket"),
    ("NoSuchKey", 404, "not_found"),
    ("404", 404, "not_found"),
    ("NoSuchUpload", 404, "not_found"),
    ("PreconditionFailed", 412, "exists"),
    ("InvalidRequest", 400, "refused"),
    ("EntityTooLarge", 400, "refused"),
    ("InvalidObjectState", 403, "refused"),
    ("SomethingNew", 400, "refused"),
]

ROUTE53_TABLE = [
    ("Throttling", 400, "transient"),
    ("ThrottlingException", 400, "transient"),
    ("PriorRequestNotComplete", 400, "transient"),
    ("ServiceUnavailable", 503, "transient"),
    ("InvalidChangeBatch", 400, "refused"),
    ("InvalidInput", 400, "refused"),
    ("NoSuchHostedZone", 404, "no_bucket"),
    ("AccessDenied", 403, "denied"),
]


@pytest.mark.parametrize(("code", "status", "kind"), S3_TABLE + ROUTE53_TABLE)
def test_aws_error_codes(code: str, status: int, kind: str) -> None:
    assert classify_aws(code, status) == kind


def _client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {
            "Error": {"Code": code, "Message": "m"},
            "ResponseMetadata": {
                "RequestId": "r",
                "HostId": "h",
                "HTTPStatusCode": status,
                "HTTPHeaders": {},
                "RetryAttempts": 0,
            },
        },
        "GetObject",
    )


def _repo() -> S3Repository:  # an S3Repository needs no service to classify
    return S3Repository(
        RepositoryConfig(url="s3://b/p", endpoint_url="http://127.0.0.1:9", region="eu-north-1")
    )


@pytest.mark.parametrize(("code", "status", "kind"), S3_TABLE)
def test_s3_repository_wraps_each_code_in_its_class(code: str, status: int, kind: str) -> None:
    err = _repo()._wrap(_client_error(code, status), "object x")
    assert is_transient(err) == (kind == "transient"), err
    assert isinstance(err, TransientError if kind == "transient" else PermanentError)


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:9"), True),
        (ConnectTimeoutError(endpoint_url="http://127.0.0.1:9"), True),
        (ReadTimeoutError(endpoint_url="http://127.0.0.1:9"), True),
        (ConnectionResetError(104, "reset"), True),
        (TimeoutError(), True),
        (NoCredentialsError(), False),
        (ParamValidationError(report="bad"), False),
        (KeyError("Contents"), False),
        (AttributeError("'list' object has no attribute 'get'"), False),
        (TypeError("x"), False),
    ],
)
def test_non_service_errors(exc: Exception, transient: bool) -> None:
    err = _repo()._wrap(exc, "listing wal")
    assert is_transient(err) == transient
    if isinstance(exc, KeyError | AttributeError | TypeError):
        # a bug is a bug: not retried, not reported as an unreachable repository
        assert isinstance(err, InternalError) and "unreachable" not in str(err)
        assert type(exc).__name__ in str(err)


def test_route53_throttling_is_transient() -> None:
    from tasks.dns_switch import _r53_kind

    assert _r53_kind(_client_error("Throttling", 400)) == ("Throttling", True)
    assert _r53_kind(_client_error("PriorRequestNotComplete", 400))[1] is True
    assert _r53_kind(_client_error("InvalidChangeBatch", 400))[1] is False


COMMAND_TABLE = [
    # (stderr tail, timed out, transient)
    ("pg_basebackup: error: could not connect to server: Connection refused", False, True),
    (
        'pg_basebackup: error: connection to server at "127.0.0.1", port 5432 failed: Connection refused',
        False,
        True,
    ),
    ('pg_dump: error: connection to server at "10.0.0.1", port 5432 failed: timeout expired', False, True),
    (
        'pg_basebackup: error: connection to server at "127.0.0.1", port 5432 failed: FATAL:  the database '
        "system is starting up",
        False,
        True,
    ),
    ("pg_dump: error: server closed the connection unexpectedly", False, True),
    (
        'psql: error: connection to server at "127.0.0.1", port 5432 failed: FATAL:  sorry, too many '
        "clients already",
        False,
        True,
    ),
    ("pg_basebackup timed out after 600s", True, True),
    (
        'pg_basebackup: error: connection to server at "127.0.0.1", port 5432 failed: FATAL:  password '
        'authentication failed for user "gravl"',
        False,
        False,
    ),
    (
        'pg_dump: error: connection to server at "127.0.0.1", port 5432 failed: FATAL:  no pg_hba.conf '
        'entry for host "127.0.0.1"',
        False,
        False,
    ),
    (
        'pg_dump: error: connection to server at "127.0.0.1", port 5432 failed: FATAL:  database "x" does '
        "not exist",
        False,
        False,
    ),
    ('pg_restore: error: could not execute query: ERROR:  relation "t" already exists', False, False),
    ("tar exited 2 extracting b: tar: Unexpected EOF in archive", False, False),
    ("pg_basebackup: error: could not create directory: No space left on device", False, False),
]


@pytest.mark.parametrize(("text", "timed_out", "transient"), COMMAND_TABLE)
def test_subprocess_failures(text: str, timed_out: bool, transient: bool) -> None:
    err = command_error(text, timed_out=timed_out)
    assert isinstance(err, CommandFailed)
    assert isinstance(err, CommandInterrupted if transient else CommandRejected)
    assert is_transient(err) == transient


@pytest.mark.integration  # runs processes
def test_subprocess_timeout_through_the_one_helper() -> None:
    from tasks.proc import run

    with pytest.raises(CommandInterrupted, match="timed out"):
        run(["sleep", "5"], timeout=0.2)
    with pytest.raises(CommandRejected, match="exited 1"):
        run(["false"], timeout=5)


def test_table_has_no_code_in_two_kinds() -> None:
    # one dict: a code cannot be listed twice with two meanings
    source = (ROOT / "tasks" / "errors.py").read_text()
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "AWS_CODES":
            keys = [k.value for k in node.value.keys]  # type: ignore[union-attr]
            assert len(keys) == len(set(keys)) == len(AWS_CODES)


@pytest.mark.integration  # runs pg_basebackup
def test_pg_basebackup_against_a_closed_port_is_transient(tmp_path: Path) -> None:
    # the real program's real message, through the one subprocess helper
    from tasks.proc import pg_bin, run

    with pytest.raises(CommandFailed) as info:
        run(
            [
                pg_bin("pg_basebackup"),
                "-d",
                "host=127.0.0.1 port=1 connect_timeout=2",
                "-D",
                str(tmp_path / "x"),
                "-Ft",
            ],
            timeout=30,
        )
    assert is_transient(info.value), str(info.value)


@pytest.mark.integration  # talks to the session PostgreSQL
def test_a_refused_login_is_permanent_and_no_server_is_transient(pg_primary: LocalCluster) -> None:
    from tasks.postgres import LoginRefused, ServerDown, ServerUnreachable, connect

    with pytest.raises(ServerDown) as down:
        connect("host=127.0.0.1 port=1 user=postgres", timeout=2)
    assert is_transient(down.value)
    with pytest.raises(LoginRefused) as refused:
        connect(f"host=127.0.0.1 port={pg_primary.port} user=postgres dbname=no_such_db", timeout=5)
    assert not is_transient(refused.value) and isinstance(refused.value, ServerUnreachable)
