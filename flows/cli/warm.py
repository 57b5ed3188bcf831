"""Entry point: the client side of the warm process — hand a command to ``gravl-dr warm``.

A flow command pays about a second and a half to import Prefect before it does anything. The
warm process (``gravl-dr warm``, see :mod:`flows.cli.warmserver`) has imported Prefect and the
flows once, and forks a fresh child per command. This module is what every ``gravl-dr`` call
runs first, so it imports nothing beyond the standard library's socket layer: it finds the warm
process's socket for this environment, passes the command's argv, environment, working
directory and its stdin/stdout/stderr file descriptors (SCM_RIGHTS), forwards SIGINT, SIGTERM,
SIGHUP and SIGQUIT to the child and exits with the child's status. When no warm process
answers — no socket, a stale one, a refusal — it returns None and the command runs in this
process exactly as it would without one.

Protocol (one Unix stream connection per command, same user only):
  client  -> ``GRV1`` + length (4 bytes) with the three descriptors, then the JSON request
             (argv, environment, directory, and the forwarded signals the client ignores)
  server  -> ``A`` (accepted) or ``N`` + a reason (the client runs the command itself)
  client  -> ``G`` (go: from here on the command runs there, never twice)
  client  -> ``S`` + signal number, for each signal the client receives
  server  -> ``X`` + exit status (4 bytes, signed; -N: killed by signal N)
If the client goes away (kill -9), the server's session sees end-of-file and sends SIGTERM to
the command, then SIGKILL after ``ORPHAN_GRACE_SECONDS``.

Started on first use: a flow command typed at a terminal (stdin and stderr are terminals) that
finds no warm process for its environment starts one in the background — detached, on the
per-environment socket in the owner-only directory, exiting after ``GRAVL_DR_WARM_IDLE`` seconds
(default 1800) without a command — and runs itself in-process; the next command is served warm.
Scripts, cron, CI, tests and PostgreSQL's hooks (no terminal) never start one, nor does a
command with ``GRAVL_DR_NO_WARM`` set or an explicit ``GRAVL_DR_WARM_SOCKET`` (the operator runs
that warm process: systemd, the Kubernetes worker). The started process gets only the
import-time environment and the basics (PATH, HOME, locale), never the command's secrets.
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import json
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

MAGIC = b"GRV1"
SOCKET_ENV = "GRAVL_DR_WARM_SOCKET"  # an explicit socket (else one per environment, see socket_path)
OFF_ENV = "GRAVL_DR_NO_WARM"  # set (non-empty): never use a warm process
IDLE_ENV = "GRAVL_DR_WARM_IDLE"  # seconds a warm process started on first use waits for a command
IDLE_SECONDS = 1800.0
# The commands that run a flow (what the warm process saves time for): only they start one.
FLOW_COMMANDS = frozenset(
    {"backup", "restore", "demo", "expire", "wal-check", "drill", "failover", "failback", "drill-failover"}
)
# What a warm process started on first use keeps of the command's environment, besides the
# import-time variables: enough to find its home, binaries and locale, nothing secret.
BASIC_NAMES = (
    "HOME",
    "PATH",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "XDG_RUNTIME_DIR",
    "USER",
    "LOGNAME",
)
START_BACKOFF_SECONDS = 30.0  # no second start while its log was written this recently
ACCEPT_TIMEOUT = 5.0  # seconds to wait for A/N before running in-process
ORPHAN_GRACE_SECONDS = 30.0
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
# What Prefect, Python and gravl-dr read when a module is imported: a warm process imported
# them with its own values, so it only serves commands whose values are the same. Variables read
# per command (GRAVL_DR_CONFIG, PG*, AWS_*, the encryption key) cross with the request instead.
IMPORT_TIME_PREFIXES = ("PREFECT_",)
IMPORT_TIME_NAMES = (
    "DO_NOT_TRACK",
    "PYTHONPATH",
    "PYTHONHASHSEED",
    "GRAVL_DR_PUSHER_IDLE",
    "GRAVL_DR_PREFETCHER_IDLE",
)


def fingerprint(env: Mapping[str, str]) -> str:
    """A digest of the import-time environment (after gravl-dr's Prefect defaults) and of the
    interpreter: two processes with the same fingerprint import Prefect and the flows alike."""
    from flows.prefect_env import PREFECT_DEFAULTS

    effective = {**PREFECT_DEFAULTS, **env}
    items = sorted(
        (k, v) for k, v in effective.items() if k.startswith(IMPORT_TIME_PREFIXES) or k in IMPORT_TIME_NAMES
    )
    blob = json.dumps([sys.executable, str(Path(__file__).resolve().parent), items])
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def socket_dir(env: Mapping[str, str] = os.environ) -> Path:
    """Owner-only directory for this user's warm sockets."""
    base = env.get("XDG_RUNTIME_DIR") or "/tmp"
    return Path(base) / f"gravl-dr-warm-{os.geteuid()}"


def socket_path(env: Mapping[str, str]) -> Path:
    explicit = env.get(SOCKET_ENV)
    if explicit:
        return Path(explicit)
    return socket_dir(env) / f"{fingerprint(env)}.sock"


def private_dir_ok(path: Path) -> bool:
    """The socket's directory belongs to us and nobody else can enter it (no planted socket)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    import stat

    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077


def run_remote(argv: Sequence[str]) -> int | None:
    """Run the command in the warm process; its exit status, or None to run it in this process."""
    env = dict(os.environ)
    if env.get(OFF_ENV):
        return None
    path = socket_path(env)
    if not os.path.exists(path) or not private_dir_ok(path.parent):
        start_on_first_use(argv, env, path)
        return None
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(ACCEPT_TIMEOUT)
        sock.connect(str(path))
    except OSError:
        start_on_first_use(argv, env, path)
        return None  # stale socket or no daemon: in-process
    try:
        if not _handshake(sock, argv, env):
            sock.close()
            return None
    except OSError:
        sock.close()
        return None
    except KeyboardInterrupt:  # Ctrl-C before the command started: nothing ran
        sys.stderr.write("gravl-dr: interrupted\n")
        return 130
    return _wait_for_status(sock)


def command_word(argv: Sequence[str]) -> str | None:
    """The command of a gravl-dr command line (the first word that is not a global option)."""
    words = iter(argv)
    for word in words:
        if word == "--config":
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def start_on_first_use(argv: Sequence[str], env: Mapping[str, str], path: Path) -> bool:
    """Start a warm process for this environment in the background when a flow command is typed
    at a terminal and none answers (see the module's docstring); True if one was started."""
    if env.get(SOCKET_ENV) or command_word(argv) not in FLOW_COMMANDS or not _at_a_terminal():
        return False
    try:
        path.parent.mkdir(mode=0o700, exist_ok=True)
    except OSError:
        return False
    log = _start_log(path) if private_dir_ok(path.parent) else None
    if log is None:
        return False
    keep = {
        k: v
        for k, v in env.items()
        if k in BASIC_NAMES or k.startswith(IMPORT_TIME_PREFIXES) or k in IMPORT_TIME_NAMES
    }
    command = [sys.executable, "-m", "flows.cli", "warm", "--socket", str(path)]
    try:
        os.posix_spawn(
            sys.executable,
            [*command, "--idle-exit", str(idle_seconds(env)), "--detach"],
            keep,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, log, 1),
                (os.POSIX_SPAWN_DUP2, log, 2),
            ],
            setsid=True,
        )
    except OSError:
        return False
    finally:
        os.close(log)
    return True


def _at_a_terminal() -> bool:
    """An operator typing: stdin and stderr are terminals (a script's, cron's or a test's are not)."""
    try:
        return os.isatty(0) and os.isatty(2)
    except OSError:
        return False


def idle_seconds(env: Mapping[str, str]) -> float:
    try:
        idle = float(env.get(IDLE_ENV) or IDLE_SECONDS)
    except ValueError:
        return IDLE_SECONDS
    return idle if idle > 0 else IDLE_SECONDS


def _start_log(path: Path) -> int | None:
    """The started process's log (beside its socket), opened for it; None while one is starting
    or just failed (its log was written in the last START_BACKOFF_SECONDS)."""
    log_path = path.with_suffix(".log")
    try:
        if time.time() - os.stat(log_path).st_mtime < START_BACKOFF_SECONDS:
            return None
    except OSError:
        pass  # no log yet: never started here
    try:
        log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    except OSError:
        return None
    try:
        os.write(log, f"gravl-dr: starting a warm process on first use ({time.ctime()})\n".encode())
    except OSError:
        os.close(log)
        return None
    return log


def _handshake(sock: socket.socket, argv: Sequence[str], env: dict[str, str]) -> bool:
    request = json.dumps(
        {
            "argv": list(argv),
            "env": env,
            "cwd": os.getcwd(),
            "fingerprint": fingerprint(env),
            "ignored": ignored_signals(),
        }
    ).encode()
    fds = array.array("i", [0, 1, 2])
    sock.sendmsg(
        [MAGIC + struct.pack("!I", len(request))], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())]
    )
    sock.sendall(request)
    answer = sock.recv(1)
    if answer != b"A":
        return False  # N + reason, or the daemon closed: run in-process
    _forward_signals(sock)  # from "go" on, a signal is the command's
    sock.sendall(b"G")
    return True


def ignored_signals() -> list[int]:
    """The forwarded signals this process was started with ignored (``nohup``: SIGHUP; a
    script's background job: SIGINT and SIGQUIT). The command ignores them too, as it would
    in-process; the client still forwards them (a terminal prompt answers Ctrl-C regardless)."""
    return [int(sig) for sig in FORWARDED if signal.getsignal(sig) == signal.SIG_IGN]


def _forward_signals(sock: socket.socket) -> None:
    """A signal this client gets goes to the command. (A Python signal handler runs in this
    thread between two calls, so it may write to the socket; an interrupted recv is retried.)"""

    def forward(signum: int, frame: Any) -> None:
        with contextlib.suppress(OSError):
            sock.sendall(b"S" + bytes([signum]))

    for sig in FORWARDED:
        signal.signal(sig, forward)


def _wait_for_status(sock: socket.socket) -> int:
    """Wait for the command's exit status (the signals go on being forwarded); exit as it did."""
    sock.settimeout(None)
    buf = b""
    while len(buf) < 5:
        try:
            chunk = sock.recv(64)
        except OSError:
            chunk = b""
        if not chunk:
            sys.stderr.write("gravl-dr: error: the warm process ended the command without an exit status\n")
            return 255
        buf += chunk
    status = int(struct.unpack("!i", buf[1:5])[0])
    return status if status >= 0 else 128 - status


def wait_for_socket(path: Path, timeout: float) -> bool:
    """For tests and the bench: the warm process listens on path."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(str(path))
                return True
        except OSError:
            time.sleep(0.05)
    return False
