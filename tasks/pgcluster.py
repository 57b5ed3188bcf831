"""Adapter: local PostgreSQL clusters driven by initdb/pg_ctl (demo, drills, restore --start, tests).

The server refuses to run as root (postgres/main.c), so when we are root every server-side
program runs as ``os_user`` and the data directory is owned by it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tasks.errors import CommandFailed, PreconditionFailed
from tasks.polling import poll_until
from tasks.proc import pg_bin, run


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def pid_alive(pid: int) -> bool:
    """True when a process with this pid exists (one we may not signal counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def chown_tree(path: Path, os_user: str) -> None:
    """Give a tree to os_user when we are root (the server insists on owning its data)."""
    if os.geteuid() != 0:
        return
    pw = pwd.getpwnam(os_user)
    if not path.is_dir():
        os.lchown(path, pw.pw_uid, pw.pw_gid)
        return
    for root, dirs, files in os.walk(path):
        os.chown(root, pw.pw_uid, pw.pw_gid)
        for name in dirs + files:
            with contextlib.suppress(FileNotFoundError):
                os.lchown(os.path.join(root, name), pw.pw_uid, pw.pw_gid)


def make_private_dir(prefix: str, os_user: str, base: str | None = None) -> Path:
    """A fresh directory the server user can use (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base or "/tmp"))
    path.chmod(0o700)
    chown_tree(path, os_user)
    return path


def postmaster_running(pgdata: Path) -> bool:
    """True when postmaster.pid names a live postgres process (a stale file after SIGKILL does not)."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().splitlines()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return False
    if not pid_alive(pid):
        return False
    try:
        # A zombie (killed, not yet reaped) has an empty command line: not running.
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
    return b"postgres" in cmdline or b"postmaster" in cmdline


def server_logfile(pgdata: Path) -> Path:
    """Where a server started by gravl-dr logs: next to its data directory, never inside it."""
    return pgdata.parent / f"{pgdata.name}.log"


def log_tail(logfile: Path, lines: int = 8) -> str:
    try:
        kept = logfile.read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return ""
    return " | ".join(kept)


def start_server(
    pgdata: Path,
    *,
    os_user: str,
    bindir: str = "auto",
    timeout: int = 60,
    options: str | None = None,
    env: Mapping[str, str] | None = None,
) -> None:
    """pg_ctl start -w, logging next to the data directory; a failure carries the log's tail.

    The one place gravl-dr starts a server (node steps, restores, drills, the demo, tests).
    ``options``: extra postgres arguments (pg_ctl -o); ``env``: variables the server passes on to
    its archive_command and restore_command, on top of the few every child gets (tasks.proc).
    """
    logfile = server_logfile(pgdata)
    logfile.touch(exist_ok=True)
    chown_tree(logfile, os_user)
    argv = [pg_bin("pg_ctl", bindir), "-D", str(pgdata), "-l", str(logfile), "-w", "-t", str(timeout)]
    if options:
        argv += ["-o", options]
    try:
        run([*argv, "start"], timeout=timeout + 15, os_user=os_user, env=env)
    except CommandFailed as exc:
        raise type(exc)(f"{exc} | server log: {log_tail(logfile, 5)}") from None


def stop_server(
    pgdata: Path,
    *,
    os_user: str,
    bindir: str = "auto",
    mode: str = "fast",
    timeout: int = 60,
    check: bool = True,
) -> None:
    """pg_ctl stop -m ``mode`` -w; a no-op when no live postmaster owns the directory.

    The one place gravl-dr stops a server.
    """
    if not postmaster_running(pgdata):
        return
    run(
        [pg_bin("pg_ctl", bindir), "-D", str(pgdata), "-m", mode, "-w", "-t", str(timeout), "stop"],
        timeout=timeout + 15,
        os_user=os_user,
        check=check,
    )


@dataclass
class LocalCluster:
    pgdata: Path
    port: int
    host: str = "127.0.0.1"
    os_user: str = "postgres"
    bindir: str = "auto"
    user: str = "postgres"
    dbname: str = "postgres"

    @property
    def logfile(self) -> Path:
        return server_logfile(self.pgdata)

    def dsn(self, dbname: str | None = None) -> str:
        return f"host={self.host} port={self.port} user={self.user} dbname={dbname or self.dbname}"

    def bin(self, name: str) -> str:
        return pg_bin(name, self.bindir)

    def initdb(self, *, checksums: bool = False, extra_conf: dict[str, str] | None = None) -> None:
        self.pgdata.mkdir(parents=True, exist_ok=True)
        self.pgdata.chmod(0o700)
        chown_tree(self.pgdata, self.os_user)
        argv = [
            self.bin("initdb"),
            "-D",
            str(self.pgdata),
            "-A",
            "trust",
            "-U",
            self.user,
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
        ]
        if checksums:
            argv.append("--data-checksums")
        run(argv, timeout=120, os_user=self.os_user)
        conf = {
            "listen_addresses": f"'{self.host}'",
            "port": str(self.port),
            "unix_socket_directories": "''",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "on",
            "wal_level": "replica",
            "max_wal_senders": "10",
            "wal_keep_size": "'256MB'",
            "shared_buffers": "'64MB'",
            "max_connections": "40",
            "logging_collector": "off",
        }
        conf.update(extra_conf or {})
        self.append_conf(conf)
        hba = self.pgdata / "pg_hba.conf"
        with open(hba, "a") as fh:
            fh.write("host replication all 127.0.0.0/8 trust\nhost all all 127.0.0.0/8 trust\n")

    def append_conf(self, settings: dict[str, str], file: str = "postgresql.conf") -> None:
        with open(self.pgdata / file, "a") as fh:
            for key, value in settings.items():
                fh.write(f"{key} = {value}\n")

    def start(self, timeout: int = 60, env: Mapping[str, str] | None = None) -> None:
        """pg_ctl start -w on this cluster's port (see start_server)."""
        start_server(
            self.pgdata,
            os_user=self.os_user,
            bindir=self.bindir,
            timeout=timeout,
            options=f"-p {self.port} -k ''",
            env=env,
        )

    def stop(self, mode: str = "fast", timeout: int = 60) -> None:
        if self.is_running():
            stop_server(
                self.pgdata, os_user=self.os_user, bindir=self.bindir, mode=mode, timeout=timeout, check=False
            )

    def is_running(self) -> bool:
        if not (self.pgdata / "postmaster.pid").exists():
            return False
        proc = run(
            [self.bin("pg_ctl"), "-D", str(self.pgdata), "status"],
            timeout=30,
            os_user=self.os_user,
            check=False,
        )
        return proc.returncode == 0

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.pgdata / "postmaster.pid").read_text().splitlines()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return None

    def log_tail(self, lines: int = 8) -> str:
        return log_tail(self.logfile, lines)

    def wait_ready(self, timeout: float = 60) -> None:
        def ready() -> bool:
            proc = run(
                [self.bin("pg_isready"), "-h", self.host, "-p", str(self.port)], timeout=10, check=False
            )
            return proc.returncode == 0

        if poll_until(ready, timeout=timeout, interval=0.1):
            return
        raise PreconditionFailed(f"server on port {self.port} not ready after {timeout:.0f}s")

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.stop(mode="immediate")
        pid = self.postmaster_pid()
        if pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, 9)
        shutil.rmtree(self.pgdata, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            self.logfile.unlink()
