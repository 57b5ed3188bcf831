"""Adapter: point-in-time recovery settings for a restored data directory, and proof of where it stopped.

``write_recovery_settings`` writes ``recovery.signal`` and the recovery parameters into
``postgresql.auto.conf`` (restore_command through ``gravl-dr wal-fetch``, one recovery_target_*,
recovery_target_timeline = latest, recovery_target_action = promote). ``wait_for_recovery``
waits for the promotion and reads the point reached from the server's own record: the log
("recovery stopping before ...", "redo done at ...", "last completed transaction was at log time
..."), ``pg_last_xact_replay_timestamp()`` and the new timeline's ``.history`` file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks import walserve
from tasks.backup import list_backups, resolve_backup
from tasks.errors import ConfigError, NotFound, PreconditionFailed
from tasks.models import LSN_RE, Manifest, format_lsn, parse_lsn
from tasks.pgcluster import LocalCluster, chown_tree
from tasks.polling import Progress, poll_until

if TYPE_CHECKING:
    from tasks.config import Config
    from tasks.repository import Repository

log = logging.getLogger(__name__)

TargetKind = Literal["end", "time", "lsn", "name", "xid", "immediate"]

MARK_BEGIN = "# gravl-dr recovery settings (begin)"
MARK_END = "# gravl-dr recovery settings (end)"


def parse_target_time(text: str) -> datetime:
    """An ISO-8601 timestamp; without an offset it is taken as UTC."""
    raw = text.strip()
    try:
        value = datetime.fromisoformat(raw.replace("Z", "+00:00") if raw.endswith("Z") else raw)
    except ValueError:
        raise ConfigError(
            f"invalid target time {text!r} (expected ISO 8601, e.g. 2026-11-24T10:15:00Z)"
        ) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


class RecoveryTarget(BaseModel):
    """Where recovery stops: the end of the archive (default) or a time, LSN, restore point or xid."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: TargetKind = Field(default="end", description="end | time | lsn | name | xid | immediate")
    value: str | None = Field(default=None, description="the target; None for end and immediate")

    @model_validator(mode="after")
    def _check(self) -> RecoveryTarget:
        if self.kind in ("end", "immediate"):
            if self.value is not None:
                raise ValueError(f"a recovery target of kind {self.kind!r} takes no value")
            return self
        if not self.value or not self.value.strip():
            raise ValueError(f"a recovery target of kind {self.kind!r} needs a value")
        if self.kind == "time":
            parse_target_time(self.value)
        elif self.kind == "lsn" and not LSN_RE.match(self.value.strip()):
            raise ValueError(f"invalid LSN {self.value!r} (expected e.g. 0/3000028)")
        elif self.kind == "xid" and not self.value.strip().isdigit():
            raise ValueError(f"invalid transaction id {self.value!r} (expected digits)")
        elif self.kind == "name" and len(self.value) > 63:
            raise ValueError("a restore point name has at most 63 characters")
        return self

    @classmethod
    def from_options(
        cls,
        *,
        time: str | None = None,
        lsn: str | None = None,
        name: str | None = None,
        xid: str | None = None,
    ) -> RecoveryTarget:
        """At most one of the CLI's --target-* options; none means the end of the archive."""
        given = {
            k: v for k, v in (("time", time), ("lsn", lsn), ("name", name), ("xid", xid)) if v is not None
        }
        if len(given) > 1:
            raise ConfigError("give at most one of --target-time, --target-lsn, --target-name, --target-xid")
        if not given:
            return cls()
        kind, value = next(iter(given.items()))
        try:
            return cls(kind=kind, value=value)  # type: ignore[arg-type]
        except ValueError as exc:
            first = exc.errors()[0]["msg"] if hasattr(exc, "errors") else str(exc)
            raise ConfigError(str(first).removeprefix("Value error, ")) from None

    @property
    def time(self) -> datetime | None:
        return parse_target_time(self.value) if self.kind == "time" and self.value else None

    @property
    def lsn(self) -> int | None:
        return parse_lsn(self.value) if self.kind == "lsn" and self.value else None

    def describe(self) -> str:
        if self.kind == "end":
            return "the end of the archive"
        if self.kind == "immediate":
            return "the end of the backup (consistent point)"
        if self.kind == "time":
            assert self.time is not None
            return f"time {self.time.isoformat()}"
        return f"{self.kind} {self.value}"


class RecoveryOutcome(BaseModel):
    """Where a restored server stopped recovery, as the server itself recorded it."""

    model_config = ConfigDict(frozen=True)

    promoted: bool
    timeline: int
    reached_lsn: str | None = Field(description="where replay stopped (switch point of the new timeline)")
    last_xact_time: datetime | None = Field(description="commit time of the last replayed transaction")
    stop_message: str | None = Field(default=None, description="the server's 'recovery stopping ...' line")
    target_reached: bool = Field(description="the server reported stopping at the target")
    seconds: float = 0.0


# ---------------------------------------------------------------- writing the settings


def gravl_dr_executable() -> str:
    """The absolute path of this installation's ``gravl-dr`` (the venv's, else the one on PATH)."""
    beside = Path(sys.executable).parent / "gravl-dr"
    if beside.exists():
        return str(beside)
    found = shutil.which("gravl-dr")
    if found:
        return str(Path(found).absolute())
    raise PreconditionFailed("cannot find the gravl-dr executable for restore_command")


def _quote(value: str) -> str:
    """A postgresql.conf string literal (single quotes doubled)."""
    return "'" + value.replace("'", "''") + "'"


def _shell_word(value: str) -> str:
    """restore_command runs through /bin/sh: quote a path only when it needs it."""
    if re.fullmatch(r"[A-Za-z0-9_./:=+-]+", value):
        return value
    return "'" + value.replace("'", "'\"'\"'") + "'"


def _interpreter(script: str) -> str | None:
    """The Python of a console script (its ``#!`` line), when it is a plain absolute path."""
    try:
        with open(script, "rb") as fh:
            first = fh.readline(4096).decode(errors="replace").strip()
    except OSError:
        return None
    path = first[2:].strip() if first.startswith("#!") else ""
    return path if path.startswith("/") and " " not in path and os.access(path, os.X_OK) else None


def restore_command(config_path: str) -> str:
    """``gravl-dr wal-fetch``, started the cheap way: the installation's Python without site
    (-I -S) runs tasks/walserve.py, which serves a prefetched segment with a hard link and hands
    anything else to the full command (see tasks.walserve)."""
    from tasks import walserve

    cfg = str(Path(config_path).absolute())
    program = gravl_dr_executable()
    python = _interpreter(program)
    if python is None:
        return f"{_shell_word(program)} --config {_shell_word(cfg)} wal-fetch %f %p"
    script = str(Path(walserve.__file__).absolute())
    return f"{_shell_word(python)} -I -S {_shell_word(script)} --config {_shell_word(cfg)} wal-fetch %f %p"


# Proxy settings the AWS SDK honours; the AWS_* variables (credentials, region, profile, web
# identity for IRSA, container credentials, CA bundle, endpoints) are taken by prefix.
_PROXY_ENV = ("HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "https_proxy", "http_proxy", "no_proxy")


def repository_env(cfg: Config) -> dict[str, str]:
    """What `gravl-dr wal-fetch` / `wal-push` need in the environment of a server we start
    (its restore_command and archive_command inherit it): for an S3 repository the AWS SDK's
    variables, and the variable holding the encryption key. Subprocesses get a short allow-list
    only (tasks.proc), so without these a restore from S3 or an encrypted archive could not
    fetch WAL. Values are secrets: passed on, never logged."""
    env: dict[str, str] = {}
    if cfg.repository.url.startswith("s3://"):
        env.update({k: v for k, v in os.environ.items() if k.startswith("AWS_") or k in _PROXY_ENV})
    key_env = cfg.repository.encryption_key_env
    if key_env and key_env in os.environ:
        env[key_env] = os.environ[key_env]
    return env


def recovery_settings(
    target: RecoveryTarget,
    config_path: str,
    *,
    keep_archiving: bool = False,
    action: Literal["promote", "pause"] = "promote",
    inclusive: bool = True,
) -> dict[str, str]:
    """The postgresql.auto.conf lines for a target (values already quoted). With ``action``
    pause the server stays in recovery at the target, readable (hot standby), until restarted
    with another target or promoted."""
    settings = {
        "restore_command": _quote(restore_command(config_path)),
        "recovery_target_timeline": "'latest'",
        "recovery_target_action": f"'{action}'",
    }
    if target.kind == "time":
        when = target.time
        assert when is not None
        settings["recovery_target_time"] = _quote(when.strftime("%Y-%m-%d %H:%M:%S.%f+00"))
        settings["recovery_target_inclusive"] = "on"
    elif target.kind == "lsn":
        assert target.lsn is not None
        settings["recovery_target_lsn"] = _quote(format_lsn(target.lsn))
        # off: stop before the first record at or after the LSN, so exactly the records before it
        # are replayed (xlogrecovery.c, recoveryStopsBefore)
        settings["recovery_target_inclusive"] = "on" if inclusive else "off"
    elif target.kind == "name":
        assert target.value is not None
        settings["recovery_target_name"] = _quote(target.value)
    elif target.kind == "xid":
        assert target.value is not None
        settings["recovery_target_xid"] = _quote(target.value.strip())
        settings["recovery_target_inclusive"] = "on"
    elif target.kind == "immediate":
        settings["recovery_target"] = "'immediate'"
    if not keep_archiving:
        # A restored copy must not push its new timeline into the archive it restores from:
        # a later restore with recovery_target_timeline = latest would follow that fork.
        settings["archive_mode"] = "off"
    return settings


def write_recovery_settings(
    pgdata: Path,
    *,
    config_path: str,
    target: RecoveryTarget,
    os_user: str,
    keep_archiving: bool = False,
    action: Literal["promote", "pause"] = "promote",
    inclusive: bool = True,
) -> None:
    """Write recovery.signal and the recovery settings into pgdata/postgresql.auto.conf.

    Settings a previous call wrote are replaced, so the step can be re-run."""
    pgdata = Path(pgdata)
    if not (pgdata / "PG_VERSION").exists():
        raise PreconditionFailed(f"{pgdata} is not a PostgreSQL data directory (no PG_VERSION)")
    auto = pgdata / "postgresql.auto.conf"
    text = auto.read_text() if auto.exists() else ""
    text = _strip_block(text)
    lines = [MARK_BEGIN]
    lines += [
        f"{k} = {v}"
        for k, v in recovery_settings(
            target, config_path, keep_archiving=keep_archiving, action=action, inclusive=inclusive
        ).items()
    ]
    lines.append(MARK_END)
    if text and not text.endswith("\n"):
        text += "\n"
    auto.write_text(text + "\n".join(lines) + "\n")
    for stale in ("standby.signal",):
        (pgdata / stale).unlink(missing_ok=True)
    (pgdata / "recovery.signal").write_text("")
    chown_tree(auto, os_user)
    chown_tree(pgdata / "recovery.signal", os_user)


def _strip_block(text: str) -> str:
    out: list[str] = []
    skipping = False
    for line in text.splitlines(keepends=True):
        if line.strip() == MARK_BEGIN:
            skipping = True
            continue
        if line.strip() == MARK_END:
            skipping = False
            continue
        if not skipping:
            out.append(line)
    return "".join(out)


# ---------------------------------------------------------------- reading where it stopped

_STOP_RE = re.compile(r"recovery stopping (?:before|after|at) .*")
_REDO_DONE_RE = re.compile(r"redo done at ([0-9A-F]+/[0-9A-F]+)")
_LAST_XACT_RE = re.compile(r"last completed transaction was at log time (.+)$")
_NEW_TLI_RE = re.compile(r"selected new timeline ID: (\d+)")
_FATAL_RE = re.compile(r"(FATAL|PANIC):\s+(.*)")
# the postmaster refusing a client (postmaster.c, CAC_*): logged as FATAL too, but about the
# connection, never why recovery stopped — and a client asking just after the startup
# process's FATAL would otherwise hide it
_REFUSAL_RE = re.compile(r"^(the database system is |sorry, too many clients)")


def parse_pg_timestamp(text: str) -> datetime:
    """A timestamptz as the server prints it: '2026-11-24 10:15:00.123456+00'."""
    raw = text.strip().strip('"')
    m = re.match(r"^(\d{4}-\d{2}-\d{2}) (\d{2}:\d{2}:\d{2}(?:\.\d+)?)([+-]\d{2})(?::?(\d{2}))?$", raw)
    if not m:
        raise ValueError(f"not a timestamp: {text!r}")
    frac_time = m.group(2)
    if "." in frac_time:
        whole, frac = frac_time.split(".")
        frac_time = f"{whole}.{frac[:6].ljust(6, '0')}"
    offset = f"{m.group(3)}:{m.group(4) or '00'}"
    return datetime.fromisoformat(f"{m.group(1)}T{frac_time}{offset}").astimezone(UTC)


class LogRecord(BaseModel):
    """What the server log says about the last recovery it ran."""

    stop_message: str | None = None
    redo_done_lsn: str | None = None
    last_xact_time: datetime | None = None
    new_timeline: int | None = None
    fatal: str | None = None


def read_recovery_log(text: str) -> LogRecord:
    """Parse the server log of a recovery (the last occurrence of each message wins)."""
    rec = LogRecord()
    for line in text.splitlines():
        if m := _STOP_RE.search(line):
            rec.stop_message = m.group(0).strip()
        if m := _REDO_DONE_RE.search(line):
            rec.redo_done_lsn = m.group(1)
        if m := _LAST_XACT_RE.search(line):
            with contextlib.suppress(ValueError):
                rec.last_xact_time = parse_pg_timestamp(m.group(1))
        if m := _NEW_TLI_RE.search(line):
            rec.new_timeline = int(m.group(1))
        if (m := _FATAL_RE.search(line)) and not _REFUSAL_RE.match(m.group(2).strip()):
            rec.fatal = m.group(2).strip()
    return rec


def explain_failed_start(logfile: Path, target: RecoveryTarget) -> str | None:
    """``explain_failed_recovery`` for a server that did not start, from its log file (if any)."""
    text = logfile.read_text(errors="replace") if logfile.exists() else ""
    return explain_failed_recovery(text, target)


def explain_failed_recovery(log_text: str, target: RecoveryTarget) -> str | None:
    """An operator's sentence for a recovery the server aborted, from its log; None if unknown."""
    rec = read_recovery_log(log_text)
    if rec.fatal is None:
        return None
    reached = (
        f"replay reached {rec.redo_done_lsn or 'an unknown LSN'}, the last transaction "
        f"committed at {rec.last_xact_time.isoformat() if rec.last_xact_time else 'an unknown time'}"
    )
    if "before configured recovery target was reached" in rec.fatal:
        # PostgreSQL ran out of archived WAL before the target: either the target lies beyond
        # the archive, or a segment on the way is missing (a gap that wal-check names).
        return (
            f"{target.describe()} is past the end of the WAL archive ({reached}; server: "
            f"{rec.fatal}): run `gravl-dr wal-check` for a gap, choose an earlier target, "
            "or restore to the end of the archive"
        )
    if "restore_command" in rec.fatal or "could not restore file" in rec.fatal:
        return f"recovery stopped: fetching WAL failed ({rec.fatal}); {reached}"
    return f"recovery stopped: {rec.fatal}"


def read_history_switchpoint(pgdata: Path, timeline: int) -> tuple[int, str] | None:
    """(parent timeline, switch LSN) from the last line of ``pg_wal/<timeline>.history``."""
    path = pgdata / "pg_wal" / f"{timeline:08X}.history"
    try:
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    except FileNotFoundError:
        return None
    if not lines:
        return None
    parts = lines[-1].split("\t")
    if len(parts) < 2 or not LSN_RE.match(parts[1].strip()):
        return None
    return int(parts[0]), parts[1].strip()


def postmaster_gone(cluster: LocalCluster) -> bool:
    """The cheap half of "is the server still running" (no process started): its
    postmaster.pid is gone, unreadable, or names no live process. False means "probably
    running"; True is confirmed by ``pg_ctl status`` before anyone acts on it. A postmaster.pid
    we may not read says nothing: the failed connections then bring ``pg_ctl status`` in."""
    try:
        pid = cluster.postmaster_pid()
    except OSError:
        return False
    if pid is None or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # a live process of another user: the postmaster, as far as we can tell
    return False


def _raise_if_stopped(cluster: LocalCluster, target: RecoveryTarget) -> None:
    """PreconditionFailed with the server's own reason when it is no longer running."""
    if not cluster.is_running():
        text = _read(cluster.logfile)
        reason = explain_failed_recovery(text, target) or cluster.log_tail(4) or "no message"
        raise PreconditionFailed(f"restored server stopped during recovery: {reason}")


def wait_for_recovery(cluster: LocalCluster, target: RecoveryTarget, timeout: float) -> RecoveryOutcome:
    """Wait until the restored server has finished recovery and is promoted; return where it stopped.

    Raises PreconditionFailed when the server stops (e.g. restore_command exited > 125 on a
    corrupt segment) or when recovery does not finish within ``timeout`` seconds."""
    from tasks.postgres import connection

    t0 = time.monotonic()
    progress = Progress(f"recovery to {target.describe()}", timeout, log)
    status = "server starting"
    failed_with: list[str] = []  # the error of the last attempt to ask the server, if it failed

    # One connection, kept across polls (a hot standby's session lives through the promotion),
    # and a liveness check without a process: a poll costs the server one query, not a backend
    # start and a `pg_ctl status`, which took CPU from the replay on a small machine.
    session: list[Any] = []  # the open connection, if any
    stack = contextlib.ExitStack()

    def promoted_row() -> tuple[Any, ...] | None:
        """The server's state once it has promoted; None (and a progress line) until then."""
        nonlocal status
        if postmaster_gone(cluster) or (failed_with and not session):
            _raise_if_stopped(cluster, target)
        failed_with.clear()
        try:
            if not session:
                session.append(
                    stack.enter_context(
                        connection(cluster.dsn("postgres"), timeout=3, options="-c statement_timeout=5000")
                    )
                )
            row = (
                session[0]
                .execute(
                    "SELECT pg_is_in_recovery(), pg_last_xact_replay_timestamp(),"
                    " CASE WHEN pg_is_in_recovery() THEN NULL"
                    " ELSE pg_walfile_name(pg_current_wal_lsn()) END,"
                    " CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()::text"
                    " ELSE pg_current_wal_lsn()::text END"
                )
                .fetchone()
            )
            assert row is not None
        except Exception as exc:  # noqa: BLE001 - the server may not accept connections yet
            failed_with.append(type(exc).__name__)
            session.clear()
            with contextlib.suppress(Exception):
                stack.close()
            progress.tick(status)
            return None
        if not row[0]:
            return tuple(row)
        status = (
            f"replayed up to {row[3] or '-'}"
            f", last transaction at {row[1].astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"
            if row[1]
            else f"replayed up to {row[3] or '-'}"
        )
        progress.tick(status)
        return None

    # quick at first (most restores and drills finish within a minute; the wait is part of the
    # measured RTO), then twice a second
    with stack:
        row = poll_until(promoted_row, timeout=timeout, interval=lambda waited: 0.05 if waited < 60 else 0.5)
    if row is None:
        raise PreconditionFailed(
            f"recovery did not finish within {timeout:.0f}s ({failed_with[0]})"
            if failed_with
            else f"recovery did not finish within {timeout:.0f}s; server log: {cluster.log_tail(3)}"
        )
    last_xact: datetime | None = row[1]
    tli = int(row[2][:8], 16)
    lsn_now: str | None = row[3]
    rec = read_recovery_log(_read(cluster.logfile))
    switch = read_history_switchpoint(cluster.pgdata, tli) if tli > 1 else None
    reached = switch[1] if switch else (rec.redo_done_lsn or lsn_now)
    if last_xact is not None:
        last_xact = last_xact.astimezone(UTC)
    return RecoveryOutcome(
        promoted=True,
        timeline=tli,
        reached_lsn=reached,
        last_xact_time=last_xact or rec.last_xact_time,
        stop_message=rec.stop_message,
        target_reached=rec.stop_message is not None or target.kind == "end",
        seconds=time.monotonic() - t0,
    )


def stop_after_failed_recovery(cluster: LocalCluster) -> str:
    """Stop a restored server whose recovery failed or stopped short: it must not stay up,
    promoted and writable, at a point short of what was asked (a missing segment ends recovery
    at the gap and PostgreSQL promotes there when no target is set). Returns what was done."""
    if not cluster.is_running():
        return "the restored server is not running"
    cluster.stop(mode="fast", timeout=60)
    if cluster.is_running():
        cluster.stop(mode="immediate", timeout=30)
    if cluster.is_running():
        return (
            f"the restored server could NOT be stopped: stop it by hand "
            f"(pg_ctl -D {cluster.pgdata} stop) before anyone writes to it"
        )
    return (
        "the restored server was stopped (do not start it: it holds the database as of the "
        "point where recovery stopped)"
    )


def wait_for_pause(cluster: LocalCluster, target: RecoveryTarget, timeout: float) -> str:
    """Wait until a server recovering with ``recovery_target_action = pause`` has stopped at its
    target and paused; return the replay LSN there.

    Raises PreconditionFailed when the server stops, ends recovery, pauses without the log
    saying that it reached the target (e.g. settings lower than the source's), or does not
    pause within ``timeout`` seconds."""
    from tasks.postgres import connection

    progress = Progress(f"recovery to pause at {target.describe()}", timeout, log)

    def paused_at() -> str | None:
        """The replay LSN once the server paused at its target; None (and a progress line) until then."""
        _raise_if_stopped(cluster, target)
        row = None
        # the server may not accept connections yet
        with contextlib.suppress(Exception), connection(cluster.dsn("postgres"), timeout=3) as conn:
            row = conn.execute(
                "SELECT pg_is_in_recovery(), CASE WHEN pg_is_in_recovery() THEN"
                " pg_get_wal_replay_pause_state() END, pg_last_wal_replay_lsn()::text"
            ).fetchone()
        if row is not None and not row[0]:
            raise PreconditionFailed(
                f"restored server ended recovery instead of pausing at {target.describe()}"
            )
        if row is not None and row[1] == "paused":
            if read_recovery_log(_read(cluster.logfile)).stop_message is None:
                raise PreconditionFailed(
                    f"recovery paused before reaching {target.describe()}: "
                    f"{cluster.log_tail(3) or 'no message'}"
                )
            return str(row[2])
        progress.tick(f"replayed up to {row[2] or '-'}" if row is not None else "server starting")
        return None

    lsn = poll_until(paused_at, timeout=timeout, interval=lambda waited: 0.2 if waited < 10 else 1.0)
    if lsn is None:
        raise PreconditionFailed(
            f"recovery did not reach {target.describe()} within {timeout:.0f}s; "
            f"server log: {cluster.log_tail(3)}"
        )
    return lsn


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


# ---------------------------------------------------------------- choosing and judging


def choose_backup(manifests: list[Manifest], target: RecoveryTarget, now: datetime | None = None) -> Manifest:
    """'latest' for a target: the newest physical backup that ended before it (manifests oldest
    first, as list_backups returns them)."""
    physical = [m for m in manifests if m.kind == "physical"]
    if not physical:
        raise NotFound("no complete physical backup in the repository")
    when = target.time
    if when is not None:
        if now is not None and when > now:
            raise PreconditionFailed(f"target time {when.isoformat()} is in the future")
        fit = [m for m in physical if m.stop_time <= when]
        if not fit:
            raise PreconditionFailed(
                f"no backup ended before the target time {when.isoformat()} (the oldest ended "
                f"{physical[0].stop_time.isoformat()})"
            )
        return fit[-1]
    lsn = target.lsn
    if lsn is not None:
        fit = [m for m in physical if m.stop_lsn and parse_lsn(m.stop_lsn) <= lsn]
        if not fit:
            raise PreconditionFailed(f"no backup ended before the target LSN {format_lsn(lsn)}")
        return fit[-1]
    return physical[-1]


def check_target_for_backup(manifest: Manifest, target: RecoveryTarget, now: datetime | None = None) -> None:
    """A target before the backup's end (its consistent point) cannot be reached from it."""
    when = target.time
    if when is not None:
        if now is not None and when > now:
            raise PreconditionFailed(f"target time {when.isoformat()} is in the future")
        if when < manifest.stop_time:
            raise PreconditionFailed(
                f"target time {when.isoformat()} is before the end of backup {manifest.id} "
                f"({manifest.stop_time.isoformat()}): choose an older backup"
            )
    lsn = target.lsn
    if lsn is not None and manifest.stop_lsn and lsn < parse_lsn(manifest.stop_lsn):
        raise PreconditionFailed(
            f"target LSN {format_lsn(lsn)} is before the end of backup {manifest.id} "
            f"({manifest.stop_lsn}): choose an older backup"
        )


def select_backup_for_restore(
    repo: Repository, ref: str, cluster: str, kind: str, target: RecoveryTarget, now: datetime | None = None
) -> Manifest:
    """The backup a restore of ``kind`` ('physical' into a data directory, 'logical' into a
    database) uses for ``ref`` ('latest' or an id): for a physical restore the newest one that
    can reach the target, checked against it. One implementation for the restore flow and the
    CLI's check before it starts the flow."""
    now = now or datetime.now(UTC)
    if kind == "physical" and ref == "latest":
        manifest = choose_backup(list_backups(repo, cluster, check=True), target, now)
    else:
        manifest = resolve_backup(repo, ref, kind=kind if ref == "latest" else None, cluster=cluster)
    if manifest.kind != kind:
        flag = "--pgdata" if manifest.kind == "physical" else "--dsn"
        raise PreconditionFailed(f"backup {manifest.id} is {manifest.kind}: use {flag}")
    if kind == "physical":
        check_target_for_backup(manifest, target, now)
    return manifest


def check_outcome(
    target: RecoveryTarget,
    outcome: RecoveryOutcome,
    *,
    archive_end_lsn: int | None,
    backup_stop_lsn: str | None,
) -> None:
    """Fail unless the server's own record shows recovery reached what was asked."""
    if not outcome.promoted:
        raise PreconditionFailed("the restored server was not promoted")
    reached = parse_lsn(outcome.reached_lsn) if outcome.reached_lsn else None
    if target.kind in ("time", "lsn", "name", "xid") and outcome.stop_message is None:
        raise PreconditionFailed(
            f"recovery ended without reaching {target.describe()} (reached {outcome.reached_lsn}, "
            f"last transaction at {outcome.last_xact_time})"
        )
    if target.kind == "time" and outcome.last_xact_time is not None:
        when = target.time
        assert when is not None
        if outcome.last_xact_time > when:
            raise PreconditionFailed(
                f"recovery replayed a transaction committed at {outcome.last_xact_time.isoformat()}, "
                f"after the target {when.isoformat()}"
            )
    if target.kind == "lsn" and reached is not None and target.lsn is not None and reached < target.lsn:
        raise PreconditionFailed(
            f"recovery stopped at {outcome.reached_lsn}, before the target LSN {target.value}"
        )
    if target.kind == "end":
        floor = max(archive_end_lsn or 0, parse_lsn(backup_stop_lsn) if backup_stop_lsn else 0)
        if reached is None or reached < floor:
            raise PreconditionFailed(
                f"recovery stopped short at {outcome.reached_lsn}: the archive holds WAL up to "
                f"{format_lsn(floor)}"
            )


def start_prefetcher(pgdata: Path, config_path: str, os_user: str, env: dict[str, str]) -> None:
    """Start the WAL prefetcher of a restored data directory just before its server starts, as
    the server's user and with its environment: by the time PostgreSQL first runs
    restore_command (a probe for the next timeline's history file), the answers are ready."""
    from tasks import walspool
    from tasks.proc import spawn_detached

    pg_wal = pgdata / "pg_wal"
    if not walspool.prefetch_primed(pg_wal / "RECOVERYXLOG") or walspool.prefetcher_pid(pg_wal):
        return
    program = gravl_dr_executable()
    python = _interpreter(program) or sys.executable
    log_path = walspool.spool_root(pg_wal) / walspool.PREFETCHER_LOG
    log_path.touch(exist_ok=True)
    chown_tree(log_path, os_user)
    try:
        pid = spawn_detached(
            walserve.daemon_argv(python, str(Path(config_path).absolute()), "wal-fetch-daemon", str(pg_wal)),
            log=log_path,
            env=env,
            os_user=os_user,
        )
        # its pid until it writes its own (the same process, or runuser's parent of it): the
        # first restore_command calls, which may come while it is still starting, wait for it
        # instead of starting a second one (tasks.walserve.ask)
        walspool.atomic_write(
            walspool.spool_root(pg_wal) / walspool.PREFETCHER_PID,
            str(pid).encode(),
            like=pg_wal,
            durable=False,
        )
    except (OSError, PreconditionFailed) as exc:  # wal-fetch starts it itself then
        log.warning("could not start the WAL prefetcher early: %s", exc)


PREFETCHER_AWAIT = 3600.0  # at most, for an early prefetcher to see the recovery settings


def spawn_early_prefetcher(pgdata: Path, config_path: str, os_user: str, env: dict[str, str]) -> int | None:
    """Start the WAL prefetcher of a restore that will start its server *before* the data step:
    the restore's own work hides its interpreter's and its repository client's start, and
    PostgreSQL's first restore_command call (the probe for the next timeline's history file)
    finds it running. It waits (tasks.walworkers.await_recovery) for recovery.signal and the
    primed prefetch, and exits without serving when this process goes, when told to stop, or
    after PREFETCHER_AWAIT seconds; until then it holds no lock and writes nothing in
    ``pgdata`` (its output goes to its log in the spool once it serves). Returns its pid (of
    runuser when switching users), None when it could not be started (the restore then starts
    one just before the server, as without it)."""
    from tasks.proc import spawn_detached

    pg_wal = (pgdata / "pg_wal").absolute()
    argv = _prefetcher_argv(pg_wal, config_path)
    argv += ["--await-recovery", str(PREFETCHER_AWAIT), "--restore-pid", str(os.getpid())]
    try:
        return spawn_detached(argv, log=Path(os.devnull), env=env, os_user=os_user)
    except (OSError, PreconditionFailed) as exc:
        log.warning("could not start the WAL prefetcher early: %s", exc)
        return None


def _is_early_prefetcher(pid: int, pg_wal: Path) -> bool:
    """Whether ``pid`` is the live prefetcher this process started for ``pg_wal`` (reaped here
    when it exited)."""
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"wal-fetch-daemon" in argv and str(pg_wal.absolute()).encode() in argv


def adopt_early_prefetcher(pgdata: Path, pid: int, os_user: str) -> bool:
    """Once the recovery settings are written and before the prefetch is primed: name the early
    prefetcher in the spool's pid file (restore_command calls then wait for it rather than
    start another, and clear_prefetch finds it) and give it its log. False when it is gone."""
    from tasks import walspool

    pg_wal = (pgdata / "pg_wal").absolute()
    if not _is_early_prefetcher(pid, pg_wal):
        return False
    log_path = walspool.spool_root(pg_wal) / walspool.PREFETCHER_LOG
    walspool.ensure_dir(log_path.parent, pg_wal)
    log_path.touch(exist_ok=True)
    chown_tree(log_path, os_user)
    walspool.atomic_write(
        walspool.spool_root(pg_wal) / walspool.PREFETCHER_PID, str(pid).encode(), like=pg_wal, durable=False
    )
    return True


def end_early_prefetcher(pgdata: Path, pid: int) -> None:
    """A restore that failed before its server started ends the prefetcher it started early
    (provably ours: our own child, not reaped yet, running wal-fetch-daemon of this pg_wal)."""
    import signal

    pg_wal = (pgdata / "pg_wal").absolute()
    if not _is_early_prefetcher(pid, pg_wal):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    with contextlib.suppress(ChildProcessError):
        poll_until(lambda: os.waitpid(pid, os.WNOHANG)[0] == pid, timeout=5.0, interval=0.02)


def _prefetcher_argv(pg_wal: Path, config_path: str) -> list[str]:
    python = _interpreter(gravl_dr_executable()) or sys.executable
    config = str(Path(config_path).absolute())
    return walserve.daemon_argv(python, config, "wal-fetch-daemon", str(pg_wal))


def check_server_can_read(config_file: str, cfg: Config, os_user: str) -> None:
    """restore_command runs as the server's OS user: it must read the config and the repository
    (else every wal-fetch would fail and recovery would stop)."""
    if os.geteuid() != 0 or os_user == "root":
        return
    from tasks.proc import run

    program = gravl_dr_executable()
    python = _interpreter(program)
    # what restore_command runs: the fast path's script and the modules of the full wal-fetch
    # (importing them, not building every command's parser: that costs a second of the RTO)
    probe = (
        [python, "-P", "-c", "import flows.cli.wal, tasks.walworkers, tasks.walserve"]
        if python
        else [program, "--help"]
    )
    probe_run = run(probe, timeout=60, os_user=os_user, check=False)
    if probe_run.returncode != 0:
        raise PreconditionFailed(
            f"the restored server runs restore_command as {os_user}, who cannot run {program} "
            f"(is its Python interpreter readable by {os_user}?): "
            f"{(probe_run.stderr or probe_run.stdout).strip()[-200:]}"
        )
    paths = [("config file", config_file)]
    if cfg.repository.url.startswith("file://"):
        paths.append(("repository", urlparse(cfg.repository.url).path))
    for what, path in paths:
        probe = ["test", "-r", path] if what == "config file" else ["test", "-r", path, "-a", "-x", path]
        if run(probe, timeout=10, os_user=os_user, check=False).returncode != 0:
            raise PreconditionFailed(
                f"the restored server runs restore_command as {os_user}, who cannot read the {what} "
                f"{path}: grant read access (and search access to its folders)"
            )


def clear_prefetch(pgdata: Path, timeout: float = 10.0) -> int | None:
    """Once the server promoted (no restore_command call will come any more): tell the WAL
    prefetcher to exit (it lingers a few seconds after recovery.signal goes, for PostgreSQL's
    last calls), then drop what it prefetched that recovery did not use. A prefetcher still
    there after ``timeout`` seconds (a request to the repository that hangs) is stopped, with
    a warning saying what it was doing: nothing it fetches can be served any more, and it would
    write into the folder being removed. Returns the pid of a prefetcher stopped that way."""
    from tasks import walspool
    from tasks.walworkers import STOP_FILE

    pg_wal = pgdata / "pg_wal"
    folder = pg_wal / "gravl-dr" / "prefetch"
    with contextlib.suppress(OSError):
        if folder.parent.is_dir():  # (the folder may not be there yet for an early prefetcher)
            walspool.ensure_dir(folder, pg_wal)
            (folder / STOP_FILE).touch()
    stopped = None
    if not poll_until(lambda: _prefetcher_gone(pg_wal), timeout=timeout, interval=0.02):
        stopped = _stop_prefetcher(pg_wal, timeout)
    shutil.rmtree(folder, ignore_errors=True)
    return stopped


def _prefetcher_gone(pg_wal: Path) -> bool:
    """No live prefetcher; one that is our own child (started without switching users) and has
    exited is reaped here, else its zombie would look alive."""
    from tasks.walspool import prefetcher_pid

    pid = prefetcher_pid(pg_wal)
    if pid is None:
        return True
    with contextlib.suppress(ChildProcessError):
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    return False


def _stop_prefetcher(pg_wal: Path, waited: float) -> int | None:
    import signal

    from tasks import walspool

    pid = walspool.our_prefetcher(pg_wal)
    if pid is None:  # gone meanwhile, or the pid file names a process that is not ours
        return None
    log.warning(
        "the WAL prefetcher of %s (pid %d) had not exited %.0f s after recovery ended and it was "
        "told to (%s): stopping it",
        pg_wal,
        pid,
        waited,
        walspool.prefetcher_activity(pg_wal),
    )
    for sig, grace in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        if poll_until(lambda: _prefetcher_gone(pg_wal), timeout=grace, interval=0.05):
            return pid
    log.warning("the WAL prefetcher of %s (pid %d) did not stop", pg_wal, pid)
    return pid
