"""Entry point: ``gravl-dr warm`` — a long-lived process with Prefect and the flows imported,
which runs each command handed to it (see :mod:`flows.cli.warm`) in a fresh forked child.

Fork safety: the warm process only imports. It starts no thread, no event loop, no API client
and no log worker (it checks that it has one thread before it listens); every such thing starts
in the child, after the fork, exactly as in a ``gravl-dr`` process. Prefect reads its settings
when it is imported, so the warm process serves only requests whose import-time environment
(PREFECT_* and a few more, :func:`flows.cli.warm.fingerprint`) is its own — any other request
is refused and runs in-process — and each child re-reads the settings and re-applies Prefect's
logging configuration from the request's environment before running the command. When the code
on disk changes, the warm process refuses the request and exits (systemd restarts it).

Each connection gets a session process (forked): it checks the peer is this user, receives the
request and the client's stdin/stdout/stderr, forks the command's child, forwards the client's
signals to it, and reports its exit status. The client gone (kill -9) means SIGTERM for the
child, then SIGKILL after a grace period. The environment that crosses the socket can hold
secrets (PGPASSWORD, keys): it is never logged.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import json
import logging
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flows.cli import warm
from flows.cli.runner import exit_without_teardown, prefect_environment

log = logging.getLogger("gravl_dr.warm")

RunCommand = Callable[[Sequence[str]], int]
MAX_REQUEST = 4 << 20


def register(sub: Any, run_command: RunCommand) -> None:
    p = sub.add_parser(
        "warm",
        help="keep Prefect and the flows imported and run gravl-dr commands handed to it "
        "(a systemd service next to the worker; flow commands then start in milliseconds)",
    )
    p.add_argument("--socket", help=f"listen here (default: per environment, or ${warm.SOCKET_ENV})")
    p.add_argument(
        "--idle-exit",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="exit after this long without a command",
    )
    p.add_argument(
        "--detach",
        action="store_true",
        help="(started on first use) work in / rather than in the directory it was started from",
    )
    p.set_defaults(func=lambda args: serve(args, run_command))


def warm_up() -> None:
    """Import what a flow command imports, and nothing that starts a thread."""
    prefect_environment()
    # Prefect itself, and what it imports only when the first flow runs (its engines, FastAPI's
    # encoder and OpenTelemetry with it, anyio's asyncio backend for httpx, the concurrency and
    # visualization helpers): else every child would import them again
    import encodings.idna  # noqa: F401
    import http.cookies  # noqa: F401

    import anyio._backends._asyncio  # noqa: F401
    import fastapi.encoders  # noqa: F401
    import prefect
    import prefect._internal.attempt_control
    import prefect._internal.control_listener
    import prefect.concurrency.context
    import prefect.concurrency.v1.context
    import prefect.engine
    import prefect.flow_engine
    import prefect.task_engine
    import prefect.telemetry.run_telemetry
    import prefect.utilities.visualization  # noqa: F401
    import pydantic.color  # noqa: F401

    import flows.backup
    import flows.demo
    import flows.drill
    import flows.drill_failover
    import flows.failback
    import flows.failover
    import flows.restore
    import flows.retention
    import flows.unlock
    import flows.verify
    import flows.wal  # noqa: F401


def _warm_up_for_forking() -> dict[str, float]:
    """Import everything; the sources loaded (to notice a code change). Refuses if an import
    started a thread: a fork would copy its locks in whatever state."""
    warm_up()
    if threading.active_count() != 1:
        from tasks.errors import PreconditionFailed

        raise PreconditionFailed(
            f"importing Prefect started {threading.active_count() - 1} thread(s): forking would not be safe"
        )
    return _loaded_sources()


def _loaded_sources() -> dict[str, float]:
    """Modification times of every gravl-dr module loaded (the code a child would run)."""
    roots = tuple(str(Path(p).resolve().parent) + os.sep for p in (warm.__file__,))
    top = str(Path(warm.__file__).resolve().parents[2]) + os.sep
    out: dict[str, float] = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if not path or not name.startswith(("flows", "tasks", "deployments")):
            continue
        if path.startswith(roots) or path.startswith(top):
            with contextlib.suppress(OSError):
                out[path] = os.stat(path).st_mtime
    return out


def _code_changed(seen: dict[str, float]) -> bool:
    for path, mtime in seen.items():
        try:
            if os.stat(path).st_mtime != mtime:
                return True
        except OSError:
            return True
    return False


def _listen(path: Path) -> socket.socket:
    """Bind owner-only: the directory 0700, the socket 0600, put in place by rename."""
    if path.parent == warm.socket_dir():
        path.parent.mkdir(mode=0o700, exist_ok=True)
    if not warm.private_dir_ok(path.parent):
        from tasks.errors import PreconditionFailed

        raise PreconditionFailed(
            f"{path.parent} must be a directory of this user that nobody else can enter (mode 0700)"
        )
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(tmp))
    finally:
        os.umask(old)
    os.chmod(tmp, 0o600)
    sock.listen(64)
    os.replace(tmp, path)
    return sock


def serve(args: argparse.Namespace, run_command: RunCommand) -> int:
    env = dict(os.environ)
    path = Path(args.socket) if args.socket else warm.socket_path(env)
    mine = warm.fingerprint(env)
    lock = _lock(path)
    if lock is None:
        sys.stderr.write(f"gravl-dr: another warm process serves {path}\n")
        return 0
    sources = _warm_up_for_forking()
    if args.detach:
        os.chdir("/")  # hold no operator's directory (each command works in its own)
    with contextlib.suppress(OSError):
        os.setsid()  # no controlling terminal: a child reading the client's terminal is never stopped
    sock = _listen(path)
    ident = os.stat(path).st_ino
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # sessions are reaped by the kernel

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    sys.stderr.write(f"gravl-dr: warm process {os.getpid()} ready on {path}\n")
    sys.stderr.flush()
    try:
        while True:
            if args.idle_exit:
                ready, _, _ = select.select([sock], [], [], args.idle_exit)
                if not ready:
                    return 0
            conn, _ = sock.accept()
            stale = _code_changed(sources)
            pid = os.fork()
            if pid == 0:  # the session
                code = 1
                try:
                    sock.close()
                    os.close(lock)  # the lock is the warm process's alone, not its commands'
                    code = _session(conn, mine, run_command, "the code changed on disk" if stale else None)
                finally:
                    os._exit(code)
            conn.close()
            if stale:
                sys.stderr.write("gravl-dr: warm process exits: its code changed on disk\n")
                return 0
    finally:
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == ident:
                path.unlink()


def _lock(path: Path) -> int | None:
    """One warm process per socket: an exclusive lock held for its lifetime (two commands that
    each start one at the same moment leave one; the other exits at once)."""
    import fcntl

    if path.parent == warm.socket_dir():
        path.parent.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the client went away")
        buf += chunk
    return buf


def _receive(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    fds = array.array("i")
    msg, anc, _flags, _addr = conn.recvmsg(8, socket.CMSG_SPACE(3 * fds.itemsize))
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
    received = list(fds)
    if len(msg) < 8:
        msg += _recv_exact(conn, 8 - len(msg))
    if msg[:4] != warm.MAGIC or len(received) != 3:
        for fd in received:
            os.close(fd)
        raise ConnectionError("not a gravl-dr request")
    (size,) = struct.unpack("!I", msg[4:8])
    if size > MAX_REQUEST:
        raise ConnectionError("request too large")
    return json.loads(_recv_exact(conn, size)), received


def _session(conn: socket.socket, mine: str, run_command: RunCommand, refuse: str | None) -> int:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[
        1
    ]
    if uid != os.getuid():
        return 1
    try:
        request, fds = _receive(conn)
    except (ConnectionError, OSError, ValueError):
        return 0  # a probe (wait_for_socket) or garbage: nothing to run
    if refuse is None and not (
        request.get("fingerprint") == mine == warm.fingerprint(request.get("env", {}))
    ):
        refuse = "another environment (PREFECT_* or the interpreter differ)"
    try:
        if refuse is not None:
            conn.sendall(b"N" + refuse.encode())
            return 0
        conn.sendall(b"A")
        if _recv_exact(conn, 1) != b"G":
            return 0
    except (ConnectionError, OSError):
        return 0
    child = os.fork()
    if child == 0:
        conn.close()
        _run_child(request, fds, run_command)  # never returns
    for fd in fds:
        os.close(fd)
    return _supervise(conn, child)


def _supervise(conn: socket.socket, child: int) -> int:
    """Forward the client's signals; on its disappearance end the child; report the status."""
    pidfd = os.pidfd_open(child)
    orphaned_at: float | None = None
    while True:
        timeout = None if orphaned_at is None else 1.0
        watched: list[Any] = [conn, pidfd] if orphaned_at is None else [pidfd]
        ready, _, _ = select.select(watched, [], [], timeout)
        if pidfd in ready:
            _, status = os.waitpid(child, 0)
            code = os.waitstatus_to_exitcode(status)
            with contextlib.suppress(OSError):
                conn.sendall(b"X" + struct.pack("!i", code))
            return 0
        if orphaned_at is not None:
            if time.monotonic() - orphaned_at > warm.ORPHAN_GRACE_SECONDS:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
            continue
        try:
            data = conn.recv(64)
        except OSError:
            data = b""
        if not data:  # the client is gone (kill -9, a closed terminal): end the command as SIGTERM would
            orphaned_at = time.monotonic()
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)
            continue
        for i in range(0, len(data) - 1, 2):
            if data[i : i + 1] == b"S" and data[i + 1] in {int(s) for s in warm.FORWARDED}:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, data[i + 1])


def _run_child(request: dict[str, Any], fds: list[int], run_command: RunCommand) -> None:
    """Become the command: the client's descriptors, directory and environment; then run it
    as the in-process CLI does, and end as it does."""
    code = 1
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        # the signal dispositions a command started by the client would have had: what the
        # client ignores (nohup, a background job) stays ignored, the rest as Python starts
        ignored = {int(s) for s in request.get("ignored", [])} & {int(s) for s in warm.FORWARDED}
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_IGN if sig in ignored else signal.SIG_DFL)
        if signal.SIGINT not in ignored:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        _stdio()
        _fresh_prefect_state()
        argv = list(request["argv"])
        sys.argv = ["gravl-dr", *argv]
        code = run_command(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException as exc:  # noqa: BLE001 - the child must end through os._exit, never return to the daemon
        with contextlib.suppress(Exception):
            sys.stderr.write(f"gravl-dr: error: warm process: {type(exc).__name__}\n")
    exit_without_teardown(code)


def _stdio() -> None:
    """sys.stdin/stdout/stderr on the client's descriptors, buffered as Python buffers them at
    start-up: line by line on a terminal (stderr always), in blocks on a pipe or a file."""
    for name, fd, mode in (("stdin", 0, "r"), ("stdout", 1, "w"), ("stderr", 2, "w")):
        stream = getattr(sys, name)
        line = fd == 2 or os.isatty(fd)
        if stream is None or stream.fileno() != fd:  # the warm process started without it
            setattr(sys, name, open(fd, mode, buffering=1 if line and mode == "w" else -1, closefd=False))
        elif mode == "w":
            stream.reconfigure(line_buffering=line)


def _fresh_prefect_state() -> None:
    """Settings from this request's environment (and profile files), and logging as a fresh
    process has it before the command configures it: no handler left from the warm process."""
    import prefect.context
    import prefect.logging.configuration

    prefect.context.refresh_global_settings_context()
    prefect.logging.configuration.PROCESS_LOGGING_CONFIG.clear()  # run_flow configures it again
    manager = logging.Logger.manager
    for logger in [
        logging.getLogger(),
        *(v for v in manager.loggerDict.values() if isinstance(v, logging.Logger)),
    ]:
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
    logging.getLogger().setLevel(logging.WARNING)
