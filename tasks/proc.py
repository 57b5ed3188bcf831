"""Adapter: the one way gravl-dr runs a subprocess.

argv lists only (never a shell), an explicit environment, a timeout, stderr captured and its
tail carried by a typed error. PostgreSQL server programs refuse to run as root, so when we are
root they run as the configured OS user through ``runuser``.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from tasks.errors import PreconditionFailed, command_error

log = logging.getLogger(__name__)

# Variables a child may inherit; everything else is dropped unless passed explicitly.
_PASS_ENV = (
    "PATH",
    "HOME",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "USER",
    "LOGNAME",
    "PGPASSFILE",
    "PGPASSWORD",
    "PGSSLMODE",
    "PGSSLROOTCERT",
    "PGCONNECT_TIMEOUT",
)


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in _PASS_ENV or k.startswith("GRAVL_DR_")}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.setdefault("LANG", "C.UTF-8")
    if extra:
        env.update(extra)
    return env


def as_user(argv: Sequence[str], os_user: str | None) -> list[str]:
    """Prefix argv with runuser when we are root and a server-side program needs os_user."""
    if os_user and os.geteuid() == 0 and os_user != "root":
        return ["runuser", "-u", os_user, "--", *argv]
    return list(argv)


def tail(text: str | bytes | None, lines: int = 6) -> str:
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    kept = [ln.strip() for ln in text.strip().splitlines() if ln.strip()][-lines:]
    return " | ".join(kept)


def run(
    argv: Sequence[str],
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    os_user: str | None = None,
    cwd: str | Path | None = None,
    input: bytes | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run argv to completion; raise CommandFailed (its transient or permanent leaf) with
    stderr's tail on a non-zero exit or a timeout."""
    full = as_user(argv, os_user)
    try:
        proc = subprocess.run(
            full,
            env=child_env(env),
            cwd=cwd,
            input=input.decode() if input is not None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise command_error(f"{Path(argv[0]).name} timed out after {timeout:.0f}s", timed_out=True) from exc
    except FileNotFoundError as exc:
        raise PreconditionFailed(f"program not found: {argv[0]}") from exc
    if check and proc.returncode != 0:
        log.warning("%s exited %s: %s", Path(argv[0]).name, proc.returncode, tail(proc.stderr, 20))
        raise command_error(
            f"{Path(argv[0]).name} exited {proc.returncode}: {tail(proc.stderr) or tail(proc.stdout)}"
        )
    return proc


def popen(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    os_user: str | None = None,
    stdin: int | None = subprocess.DEVNULL,
    stdout: int | None = subprocess.PIPE,
    cwd: str | Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start argv for streaming; stderr goes to a pipe the caller must drain (see streams)."""
    full = as_user(argv, os_user)
    try:
        return subprocess.Popen(
            full,
            env=child_env(env),
            stdin=stdin,
            stdout=stdout,
            stderr=subprocess.PIPE,
            cwd=cwd,
            start_new_session=True,
        )
    except FileNotFoundError as exc:
        raise PreconditionFailed(f"program not found: {argv[0]}") from exc


def pg_bindir(configured: str = "auto") -> Path:
    """postgres.bindir: explicit, else `pg_config --bindir`, else the newest /usr/lib/postgresql/*/bin."""
    if configured != "auto":
        path = Path(configured)
        if not (path / "pg_ctl").exists():
            raise PreconditionFailed(f"postgres.bindir {configured} has no pg_ctl")
        return path
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        path = Path(out.stdout.strip())
        if out.returncode == 0 and (path / "pg_ctl").exists():
            return path
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    for path in reversed(candidates):
        if (path / "pg_ctl").exists():
            return path
    raise PreconditionFailed(
        "PostgreSQL server binaries not found (install postgresql-15 or set postgres.bindir)"
    )


def pg_bin(name: str, configured: str = "auto") -> str:
    return str(pg_bindir(configured) / name)


def spawn_detached(
    argv: Sequence[str], *, log: Path, env: Mapping[str, str] | None = None, os_user: str | None = None
) -> int:
    """Start a background helper that outlives us (its own session), output appended to ``log``;
    returns its pid (of runuser when we switch users)."""
    full = as_user(argv, os_user)
    with open(log, "ab") as out:
        try:
            proc = subprocess.Popen(
                full,
                env=child_env(env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        except FileNotFoundError as exc:
            raise PreconditionFailed(f"program not found: {argv[0]}") from exc
    return proc.pid
