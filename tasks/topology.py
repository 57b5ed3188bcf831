"""Adapter: observing and changing PostgreSQL nodes' roles — health, WAL positions, fence, promote, rebuild.

Everything here talks to a server (psycopg) or to a local data directory (pg_ctl, pg_controldata,
pg_waldump, pg_rewind, pg_basebackup through tasks.proc). Decisions live in tasks.failover.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import conninfo
from pydantic import BaseModel, ConfigDict

from tasks.config import Node
from tasks.errors import CommandFailed, DRError, PermanentError, PreconditionFailed, TransientError, one_line
from tasks.failover import NodeState, server_answered
from tasks.libpq import client_env
from tasks.pgcluster import chown_tree, pid_alive
from tasks.polling import Progress, poll_until
from tasks.postgres import ServerUnreachable, connection, dsn_field
from tasks.proc import pg_bin, run
from tasks.walnames import WAL_SEGMENT_RE, format_lsn, lsn_or_none, lsn_to_int

log = logging.getLogger(__name__)

FENCE_MARKER = "gravl-dr.fenced"
# Node-local configuration that pg_rewind and pg_basebackup would overwrite with the source's.
LOCAL_CONFIG_FILES = ("postgresql.conf", "pg_hba.conf", "pg_ident.conf")


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


def node_address(node: Node) -> str:
    host = dsn_field(node.dsn, "host") or dsn_field(node.dsn, "hostaddr") or "localhost"
    return f"{host}:{dsn_field(node.dsn, 'port') or '5432'}"


def local_pgdata(node: Node) -> Path | None:
    """The node's data directory when the config names one and it is on this host."""
    if not node.pgdata:
        return None
    path = Path(node.pgdata)
    return path if (path / "PG_VERSION").is_file() else None


# ---------------------------------------------------------------------------------------------
# Local data directory facts


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


def server_processes(pgdata: Path) -> list[int]:
    """PIDs of processes working in ``pgdata`` (every postgres process chdirs into its data directory).

    After a SIGKILL of the postmaster its children linger until they notice (PostmasterIsAlive),
    and they still hold the shared memory a single-user or new postmaster refuses to share.
    """
    target = str(pgdata.resolve())
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if os.readlink(proc / "cwd") == target:
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def wait_server_gone(pgdata: Path, timeout: float = 30) -> None:
    pids: list[int] = []

    def gone() -> bool:
        nonlocal pids
        pids = server_processes(pgdata)
        return not pids

    if not poll_until(gone, timeout=timeout, interval=0.1):
        raise PreconditionFailed(f"processes {pids} still run in {pgdata} {timeout:.0f}s after the "
                                 "postmaster stopped")


def clear_stale_pidfile(pgdata: Path) -> bool:
    """Remove postmaster.pid left by a killed postmaster.

    PostgreSQL treats the lock file as held while its PID answers kill(pid, 0), which a killed
    postmaster not yet reaped by PID 1 (a zombie) still does; single-user mode then refuses to
    start. We only remove it when no process works in the directory any more.
    """
    pidfile = pgdata / "postmaster.pid"
    if not pidfile.exists() or postmaster_running(pgdata) or server_processes(pgdata):
        return False
    with contextlib.suppress(FileNotFoundError):
        pidfile.unlink()
    return True


def controldata(pgdata: Path, *, os_user: str, bindir: str = "auto") -> dict[str, str]:
    """pg_controldata as a dict ("Database cluster state" -> "shut down", ...)."""
    proc = run([pg_bin("pg_controldata", bindir), "-D", str(pgdata)], timeout=30, os_user=os_user,
               env={"LC_ALL": "C"})
    return parse_controldata(proc.stdout)


def parse_controldata(text: str) -> dict[str, str]:
    """pg_controldata's "Key:   value" lines (LC_ALL=C) as a dict; a value may hold colons."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


_WALDUMP_LSN = re.compile(r"len \(rec/tot\):\s*\d+/\s*(\d+), tx:\s*\d+, lsn: ([0-9A-F]+/[0-9A-F]+)")


def last_local_wal_lsn(pgdata: Path, *, os_user: str, bindir: str = "auto", tries: int = 6) -> str | None:
    """End of the last complete WAL record in pg_wal of a stopped server, or None.

    Recycled segments get future names (xlog.c InstallXLogFileSegment) and hold stale pages that
    pg_waldump rejects, so we walk back from the highest name until one decodes. The end is
    start + total length of the last record: a lower bound of the real end by at most the
    record's alignment padding, which keeps RPO conservative towards zero only by < 8 bytes.
    """
    wal_dir = pgdata / "pg_wal"
    try:
        names = sorted((p.name for p in wal_dir.iterdir() if WAL_SEGMENT_RE.match(p.name)), reverse=True)
    except OSError:
        return None
    for name in names[:tries]:
        proc = run([pg_bin("pg_waldump", bindir), "-p", str(wal_dir), name], timeout=60, os_user=os_user,
                   check=False, env={"LC_ALL": "C"})
        end = waldump_end(proc.stdout)
        if end is not None:
            return end
    return None


def waldump_end(text: str) -> str | None:
    """End LSN of the last record pg_waldump printed (its start + total length), or None."""
    found = _WALDUMP_LSN.findall(text)
    if not found:
        return None
    total, start = found[-1]
    return format_lsn(lsn_to_int(start) + int(total))


# ---------------------------------------------------------------------------------------------
# Observation

_OBSERVE = """
SELECT pg_is_in_recovery(),
       current_setting('default_transaction_read_only') = 'on',
       CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_insert_lsn()::text END,
       pg_last_wal_receive_lsn()::text,
       pg_last_wal_replay_lsn()::text,
       extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8,
       CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() ELSE false END,
       (SELECT status FROM pg_stat_wal_receiver),
       (SELECT sender_host || ':' || sender_port FROM pg_stat_wal_receiver),
       (SELECT received_tli FROM pg_stat_wal_receiver),
       CASE WHEN pg_is_in_recovery() THEN NULL
            ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END,
       (SELECT timeline_id FROM pg_control_checkpoint()),
       (SELECT system_identifier::text FROM pg_control_system())
"""


def observe_node(
    node: Node,
    role: str,
    *,
    os_user: str = "postgres",
    bindir: str = "auto",
    attempts: int = 1,
    connect_timeout: int = 3,
    interval: float = 0.25,
) -> NodeState:
    """Look at one node: over SQL when it answers, else at its local data directory if any."""
    error: str | None = None
    answered = False
    row = None
    for attempt in range(attempts):
        try:
            with connection(node.dsn, timeout=connect_timeout) as conn:
                conn.execute("SET statement_timeout = '10s'")
                row = conn.execute(_OBSERVE).fetchone()
            break
        except ServerUnreachable as exc:
            error = one_line(exc)
            answered = server_answered(error)
        except psycopg.Error as exc:
            # Connected, then a statement failed (a timeout, a permission): the server is there.
            error = f"{type(exc).__name__}: {one_line(exc)}"
            answered = True
        if attempt + 1 < attempts:
            time.sleep(interval)
    pgdata = local_pgdata(node)
    base: dict[str, object] = {"name": node.name, "configured_role": role, "address": node_address(node),
            "local_pgdata": pgdata is not None}
    if pgdata is not None:
        base["fenced"] = (pgdata / FENCE_MARKER).exists()
        base["postmaster_running"] = postmaster_running(pgdata)
    if row is not None:
        in_recovery = bool(row[0])
        timeline = row[10] if not in_recovery else (row[9] or row[11])
        return NodeState.model_validate({
            **base, "reachable": True, "in_recovery": in_recovery, "read_only": bool(row[1]),
            "current_lsn": row[2], "receive_lsn": row[3], "replay_lsn": row[4],
            "replay_lag_seconds": float(row[5]) if row[5] is not None else None,
            "replay_paused": bool(row[6]), "wal_receiver": row[7], "upstream": row[8],
            "timeline": int(timeline) if timeline is not None else None, "system_identifier": row[12],
        })
    extra: dict[str, object] = {}
    if pgdata is not None and not base.get("postmaster_running"):
        # A dead server's own files say how far its WAL got (the RPO reference) and how it stopped.
        try:
            ctl = controldata(pgdata, os_user=os_user, bindir=bindir)
            extra["control_state"] = ctl.get("Database cluster state")
            extra["checkpoint_lsn"] = ctl.get("Latest checkpoint location")
            extra["system_identifier"] = ctl.get("Database system identifier")
            tli = ctl.get("Latest checkpoint's TimeLineID")
            extra["timeline"] = int(tli) if tli and tli.isdigit() else None
            extra["last_local_lsn"] = last_local_wal_lsn(pgdata, os_user=os_user, bindir=bindir)
        except DRError as exc:
            log.warning("could not read %s's data directory: %s", node.name, one_line(exc))
    return NodeState.model_validate({**base, "reachable": False, "error": error, "answered": answered, **extra})


# ---------------------------------------------------------------------------------------------
# Server control through pg_ctl (local data directories only)


def server_logfile(pgdata: Path) -> Path:
    return pgdata.parent / f"{pgdata.name}.log"


def start_server(pgdata: Path, *, os_user: str, bindir: str = "auto", timeout: int = 60) -> None:
    logfile = server_logfile(pgdata)
    logfile.touch(exist_ok=True)
    chown_tree(logfile, os_user)
    try:
        run([pg_bin("pg_ctl", bindir), "-D", str(pgdata), "-l", str(logfile), "-w", "-t", str(timeout),
             "start"], timeout=timeout + 15, os_user=os_user)
    except CommandFailed as exc:
        try:
            log_tail = " | ".join(logfile.read_text(errors="replace").strip().splitlines()[-5:])
        except OSError:
            log_tail = ""
        raise type(exc)(f"{exc} | server log: {log_tail}") from None


def stop_server(pgdata: Path, *, os_user: str, bindir: str = "auto", mode: str = "fast",
                timeout: int = 60) -> dict[str, str]:
    """Stop a local server (no-op when it is down) and return its control data afterwards."""
    if postmaster_running(pgdata):
        run([pg_bin("pg_ctl", bindir), "-D", str(pgdata), "-m", mode, "-w", "-t", str(timeout), "stop"],
            timeout=timeout + 15, os_user=os_user)
    return controldata(pgdata, os_user=os_user, bindir=bindir)


# ---------------------------------------------------------------------------------------------
# Fence


class FenceResult(Frozen):
    node: str
    action: str
    fenced: bool


def _write_fence_marker(pgdata: Path, os_user: str, reason: str) -> None:
    # standby.signal makes a restarted server come up in standby mode, i.e. read-only
    # (xlogrecovery.c readRecoverySignalFile), so a stray restart cannot fork the history.
    (pgdata / "standby.signal").touch()
    (pgdata / FENCE_MARKER).write_text(json.dumps({"fenced_at": datetime.now(UTC).isoformat(),
                                                   "by": "gravl-dr", "reason": reason}) + "\n")
    chown_tree(pgdata / "standby.signal", os_user)
    chown_tree(pgdata / FENCE_MARKER, os_user)


def fence_node(node: Node, state: NodeState, *, os_user: str, bindir: str = "auto",
               clean: bool = True) -> FenceResult:
    """Stop the old primary and mark it, or at least make it refuse writes; say what was done."""
    pgdata = local_pgdata(node)
    if pgdata is not None:
        was_running = postmaster_running(pgdata)
        if was_running:
            try:
                stop_server(pgdata, os_user=os_user, bindir=bindir, mode="fast" if clean else "immediate",
                            timeout=30)
            except CommandFailed:
                stop_server(pgdata, os_user=os_user, bindir=bindir, mode="immediate", timeout=30)
        _write_fence_marker(pgdata, os_user, "failover")
        what = "stopped it (clean shutdown)" if was_running and clean else \
            "stopped it" if was_running else "it was down"
        return FenceResult(node=node.name, fenced=True,
                           action=f"{what}; placed standby.signal in {pgdata} so a restart comes up read-only")
    if state.reachable:
        try:
            with connection(node.dsn, timeout=3) as conn:
                conn.execute("ALTER SYSTEM SET default_transaction_read_only = on")
                conn.execute("SELECT pg_reload_conf()")
                ended = conn.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
                ).fetchone()
        except (ServerUnreachable, psycopg.Error) as exc:
            return FenceResult(node=node.name, fenced=False,
                               action=f"could not make it read-only: {one_line(exc)}")
        return FenceResult(node=node.name, fenced=True,
                           action=f"made it read-only (default_transaction_read_only=on) and ended "
                           f"{ended[0] if ended else 0} session(s); a client can still override it — "
                           "stop it when you can")
    return FenceResult(node=node.name, fenced=False,
                       action="NOT fenced: unreachable and its pgdata is not on this host — make sure it "
                       "cannot come back as a primary (power it off or cut it from the network)")


# ---------------------------------------------------------------------------------------------
# Promote


class PromoteResult(Frozen):
    node: str
    already_primary: bool
    promoted_lsn: str | None  # where the new timeline starts: the last WAL the node had
    timeline: int | None
    seconds: float


def _timeline_switchpoint(conn: psycopg.Connection[Any]) -> tuple[int | None, str | None]:
    """Current timeline and where it branched off (last line of its .history file, timeline.c)."""
    row = conn.execute(
        "SELECT ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int").fetchone()
    tli = int(row[0]) if row else None
    if not tli or tli <= 1:
        return tli, None
    try:
        hist = conn.execute("SELECT pg_read_file(%s)", (f"pg_wal/{tli:08X}.history",)).fetchone()
    except psycopg.Error:
        return tli, None
    lines = [ln.split() for ln in str(hist[0] if hist else "").splitlines() if ln.strip()]
    return tli, (lines[-1][1] if lines and len(lines[-1]) > 1 else None)


def promote_node(node: Node, *, wait_seconds: int = 60) -> PromoteResult:
    """pg_promote(wait => true) after checking pg_is_in_recovery(); promoting a primary is a no-op."""
    t0 = time.monotonic()
    with connection(node.dsn, timeout=5) as conn:
        row = conn.execute("SELECT pg_is_in_recovery(), pg_last_wal_receive_lsn()::text, "
                           "pg_last_wal_replay_lsn()::text").fetchone()
        assert row is not None
        if not row[0]:
            tli, switch = _timeline_switchpoint(conn)
            return PromoteResult(node=node.name, already_primary=True, promoted_lsn=switch, timeline=tli,
                                 seconds=time.monotonic() - t0)
        before = max((p for p in (lsn_or_none(row[1]), lsn_or_none(row[2])) if p is not None), default=None)
        try:
            done = conn.execute("SELECT pg_promote(wait => true, wait_seconds => %s)",
                                (wait_seconds,)).fetchone()
        except psycopg.Error as exc:
            raise PermanentError(f"pg_promote failed on {node.name}: {one_line(exc)}") from exc
        if not done or not done[0]:
            raise TransientError(f"{node.name} did not finish promoting within {wait_seconds}s; "
                                 "re-run to check whether it completed")
        tli, switch = _timeline_switchpoint(conn)
    if switch is None and before is not None:
        switch = format_lsn(before)
    return PromoteResult(node=node.name, already_primary=False, promoted_lsn=switch, timeline=tli,
                         seconds=time.monotonic() - t0)


# ---------------------------------------------------------------------------------------------
# Validate


class CanaryResult(Frozen):
    node: str
    row_id: int
    lsn: str
    written_at: datetime
    seconds: float


def canary_write(node: Node, run_label: str, *, timeout: float = 30) -> CanaryResult:
    """Write a row on the new primary and read it back: proof that it takes writes."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with connection(node.dsn, timeout=3) as conn:
                conn.execute("SET statement_timeout = '10s'")
                conn.execute("CREATE SCHEMA IF NOT EXISTS gravl_dr")
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS gravl_dr.failover_canary ("
                    " id bigserial PRIMARY KEY, written_at timestamptz NOT NULL DEFAULT now(),"
                    " run text NOT NULL, node text NOT NULL)")
                row = conn.execute(
                    "INSERT INTO gravl_dr.failover_canary (run, node) VALUES (%s, %s) "
                    "RETURNING id, written_at", (run_label, node.name)).fetchone()
                assert row is not None
                back = conn.execute("SELECT run FROM gravl_dr.failover_canary WHERE id = %s",
                                    (row[0],)).fetchone()
                lsn = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
            if not back or back[0] != run_label:
                raise PermanentError(f"canary row {row[0]} on {node.name} did not read back")
            return CanaryResult(node=node.name, row_id=int(row[0]), lsn=str(lsn[0]) if lsn else "0/0",
                                written_at=row[1], seconds=time.monotonic() - t0)
        except (ServerUnreachable, psycopg.OperationalError) as exc:
            last = exc
        except psycopg.Error as exc:
            # read-only transaction, recovery still ending...: worth another try until the deadline
            last = exc
        time.sleep(0.1)
    raise PermanentError(f"validation failed: no canary write on {node.name} within {timeout:.0f}s: "
                         f"{one_line(last) if last else 'no attempt'}")


# ---------------------------------------------------------------------------------------------
# Replication: standby configuration, rebuild, waits


def standby_conninfo(primary: Node, application_name: str) -> str:
    """primary_conninfo for a standby: the primary's DSN without dbname (walreceiver ignores it)."""
    parts = conninfo.conninfo_to_dict(primary.dsn)
    parts.pop("dbname", None)
    parts["application_name"] = application_name
    return conninfo.make_conninfo(**{k: str(v) for k, v in parts.items() if v is not None})


def configure_standby(pgdata: Path, primary: Node, application_name: str, *, os_user: str) -> None:
    """Write standby.signal and primary_conninfo (replacing any older one) into postgresql.auto.conf."""
    auto = pgdata / "postgresql.auto.conf"
    kept = []
    if auto.exists():
        kept = [ln for ln in auto.read_text().splitlines()
                if not re.match(r"\s*primary_conninfo\s*=", ln)]
    value = standby_conninfo(primary, application_name).replace("'", "''")
    kept.append(f"primary_conninfo = '{value}'")
    auto.write_text("\n".join(kept) + "\n")
    (pgdata / "standby.signal").touch()
    with contextlib.suppress(FileNotFoundError):
        (pgdata / FENCE_MARKER).unlink()
    chown_tree(auto, os_user)
    chown_tree(pgdata / "standby.signal", os_user)


def clone_standby(source: Node, pgdata: Path, *, os_user: str, bindir: str = "auto",
                  timeout: int = 3600) -> None:
    """pg_basebackup a fresh copy of ``source`` into the empty directory ``pgdata``."""
    pgdata.mkdir(parents=True, exist_ok=True)
    pgdata.chmod(0o700)
    chown_tree(pgdata, os_user)
    env = client_env(source.dsn, dbname="postgres")
    run([pg_bin("pg_basebackup", bindir), "-D", str(pgdata), "-X", "stream", "-c", "fast",
         "--no-sync"], timeout=timeout, os_user=os_user, env=env)


class RebuildResult(Frozen):
    node: str
    method: str  # "pg_rewind", "pg_rewind (no rewind required)", "pg_basebackup re-clone"
    seconds: float
    detail: str


def rewind_possible(ctl: dict[str, str]) -> bool:
    """pg_rewind needs hint bits WAL-logged: wal_log_hints=on or data checksums (pg_rewind docs)."""
    return ctl.get("wal_log_hints setting") == "on" or ctl.get("Data page checksum version", "0") != "0"


def rebuild_as_standby(node: Node, source: Node, *, os_user: str, bindir: str = "auto",
                       allow_reclone: bool = True, timeout: int = 3600) -> RebuildResult:
    """Turn ``node`` (a former primary) into a standby of ``source``: pg_rewind, else re-clone.

    pg_rewind and pg_basebackup copy the source's configuration files; the node's own
    postgresql.conf, pg_hba.conf and pg_ident.conf are kept and restored afterwards.
    """
    t0 = time.monotonic()
    pgdata = local_pgdata(node)
    if pgdata is None:
        raise PreconditionFailed(f"cannot rebuild {node.name}: pgdata {node.pgdata!r} is not a data "
                                 "directory on this host")
    ctl = stop_server(pgdata, os_user=os_user, bindir=bindir, mode="fast")
    wait_server_gone(pgdata)
    clear_stale_pidfile(pgdata)
    saved = {name: (pgdata / name).read_bytes() for name in LOCAL_CONFIG_FILES if (pgdata / name).exists()}
    # pg_rewind brings a crashed target to a consistent state in single-user mode first, which
    # refuses standby mode: take our fence signal away for the duration.
    for name in ("standby.signal", "recovery.signal"):
        with contextlib.suppress(FileNotFoundError):
            (pgdata / name).unlink()
    if ctl.get("Database cluster state") not in ("shut down", "shut down in recovery"):
        # Finish crash recovery first, as pg_rewind would in single-user mode — but before it
        # decides whether a rewind is needed: PostgreSQL 15's pg_rewind can conclude "no rewind
        # required" from the pre-crash control file and then let single-user recovery write an
        # end-of-recovery checkpoint past the fork point, leaving a standby that cannot follow
        # the new timeline ("forked off current database system timeline before current
        # recovery point").
        run([pg_bin("postgres", bindir), "--single", "-F", "-D", str(pgdata), "template1"], input=b"",
            timeout=timeout, os_user=os_user)
        ctl = controldata(pgdata, os_user=os_user, bindir=bindir)
    method, detail = "", ""
    if rewind_possible(ctl):
        # pg_rewind (before PostgreSQL 16) takes the source's timeline from its control file, which
        # a just-promoted server updates only at its first checkpoint — a spread one, that may
        # still be running. Without it pg_rewind sees "the same timeline" and says "no rewind
        # required" wrongly (the pg_rewind docs' note on promoted sources).
        with connection(source.dsn, timeout=5) as conn:
            conn.execute("CHECKPOINT")
        env = client_env(source.dsn, dbname="postgres")
        proc = run([pg_bin("pg_rewind", bindir), "--target-pgdata", str(pgdata), "--source-server",
                    "", "--no-sync"], timeout=timeout, os_user=os_user, env=env, check=False)
        output = (proc.stdout + proc.stderr).strip()
        if proc.returncode == 0:
            method = "pg_rewind (no rewind required)" if "no rewind required" in output else "pg_rewind"
            detail = output.splitlines()[-1] if output else ""
        else:
            detail = f"pg_rewind failed ({' | '.join(output.splitlines()[-6:])}); re-cloned instead"
            log.warning("pg_rewind of %s failed: %s", node.name, output[-500:])
    else:
        detail = "pg_rewind impossible (needs wal_log_hints=on or data checksums); re-cloned"
    if not method:
        if not allow_reclone:
            raise PreconditionFailed(f"cannot rebuild {node.name}: {detail}")
        aside = pgdata.with_name(f"{pgdata.name}.gravl-dr-old-{int(time.time())}")
        pgdata.rename(aside)
        try:
            clone_standby(source, pgdata, os_user=os_user, bindir=bindir, timeout=timeout)
        except BaseException:
            shutil.rmtree(pgdata, ignore_errors=True)
            aside.rename(pgdata)
            raise
        shutil.rmtree(aside, ignore_errors=True)
        method = "pg_basebackup re-clone"
    for name, content in saved.items():
        (pgdata / name).write_bytes(content)
        chown_tree(pgdata / name, os_user)
    for leftover in ("backup_label.old", "postmaster.pid", FENCE_MARKER):
        with contextlib.suppress(FileNotFoundError):
            (pgdata / leftover).unlink()
    configure_standby(pgdata, source, node.name, os_user=os_user)
    start_server(pgdata, os_user=os_user, bindir=bindir)
    return RebuildResult(node=node.name, method=method, seconds=time.monotonic() - t0, detail=detail)


class LagResult(Frozen):
    standby: str
    primary_lsn: str
    replay_lsn: str
    seconds: float


def wait_for_zero_lag(standby: Node, primary: Node, *, timeout: float = 300,
                      interval: float = 0.5) -> LagResult:
    """Wait until ``standby`` streams from ``primary`` and has replayed its current WAL position.

    One connection to each node for the whole wait (reopened only after an error), a poll every
    ``interval`` seconds, and a progress line (positions, bytes behind, deadline) every 15 s.
    """
    progress = Progress(f"{standby.name} to catch up with {primary.name}", timeout, log)
    last = "not checked"
    with contextlib.ExitStack() as conns:
        pconn: psycopg.Connection[Any] | None = None
        sconn: psycopg.Connection[Any] | None = None
        while True:
            try:
                if pconn is None or pconn.closed:
                    pconn = conns.enter_context(connection(primary.dsn, timeout=3, autocommit=True))
                if sconn is None or sconn.closed:
                    sconn = conns.enter_context(connection(standby.dsn, timeout=3, autocommit=True))
                prow = pconn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
                srow = sconn.execute(
                    "SELECT pg_last_wal_replay_lsn()::text, (SELECT status FROM pg_stat_wal_receiver)"
                ).fetchone()
                assert prow is not None and srow is not None
                if srow[1] == "streaming" and srow[0] and lsn_to_int(srow[0]) >= lsn_to_int(prow[0]):
                    return LagResult(standby=standby.name, primary_lsn=prow[0], replay_lsn=srow[0],
                                     seconds=progress.elapsed())
                behind = f", {lsn_to_int(prow[0]) - lsn_to_int(srow[0])} bytes behind" if srow[0] else ""
                last = (f"{primary.name} at {prow[0]}, {standby.name} replayed {srow[0] or '-'}{behind}, "
                        f"receiver {srow[1] or 'not running'}")
            except (ServerUnreachable, psycopg.Error) as exc:
                last = one_line(exc)
                for conn in (pconn, sconn):
                    if conn is not None:
                        conn.close()
                pconn = sconn = None
            if progress.expired():
                break
            progress.tick(last)
            time.sleep(min(interval, max(0.0, progress.left())))
    raise TransientError(f"{standby.name} did not catch up with {primary.name} within {timeout:.0f}s "
                         f"({last})")


def wait_replayed(standby: Node, lsn: str, *, timeout: float = 60, interval: float = 0.05) -> str:
    """Wait until ``standby`` has replayed past ``lsn`` (a record starting there is applied)."""
    progress = Progress(f"{standby.name} to replay past {lsn}", timeout, log)
    target = lsn_to_int(lsn)
    last = "-"
    with connection(standby.dsn, timeout=3, autocommit=True) as conn:
        while not progress.expired():
            row = conn.execute("SELECT pg_last_wal_replay_lsn()::text").fetchone()
            last = str(row[0]) if row and row[0] else "-"
            if row and row[0] and lsn_to_int(row[0]) > target:
                return str(row[0])
            progress.tick(f"replayed up to {last}")
            time.sleep(interval)
    raise PermanentError(f"{standby.name} replayed only up to {last}, not past {lsn} within "
                         f"{timeout:.0f}s: promoting it would lose data")


# ---------------------------------------------------------------------------------------------
# Controlled switchover and rejoin (failback)


class SwitchoverResult(Frozen):
    old_primary: str
    new_primary: str
    final_checkpoint_lsn: str | None
    replayed_lsn: str | None
    promote: PromoteResult
    first_write: CanaryResult
    unavailable_seconds: float  # clean shutdown started -> first write committed on the new primary


def switch_over(old: Node, new: Node, *, os_user: str, bindir: str = "auto", label: str,
                replay_timeout: float = 60) -> SwitchoverResult:
    """Zero-loss switchover: stop ``old`` cleanly, check ``new`` replayed its shutdown checkpoint, promote.

    A clean ("fast") shutdown makes the walsenders send everything up to and including the
    shutdown checkpoint before the server exits (walsender.c WalSndDone), so a streaming standby
    that has replayed past that record has every committed transaction.
    """
    pgdata = local_pgdata(old)
    if pgdata is None:
        raise PreconditionFailed(f"cannot switch over: {old.name}'s pgdata is not on this host")
    with connection(new.dsn, timeout=3) as conn:
        row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
    new_is_standby = bool(row and row[0])
    final: str | None = None
    replayed: str | None = None
    if postmaster_running(pgdata):
        if not new_is_standby:
            raise PreconditionFailed(f"split brain: {old.name} runs and {new.name} is already a primary")
        with contextlib.suppress(DRError, psycopg.Error), connection(old.dsn, timeout=3) as conn:
            conn.execute("CHECKPOINT")  # so the shutdown checkpoint has little left to write
    t_stop = time.monotonic()
    ctl = stop_server(pgdata, os_user=os_user, bindir=bindir, mode="fast")
    if new_is_standby:
        if ctl.get("Database cluster state") != "shut down":
            raise PermanentError(
                f"{old.name} is not cleanly shut down ({ctl.get('Database cluster state')}): a zero-loss "
                "switchover is impossible; use failover instead")
        final = ctl.get("Latest checkpoint location")
        if not final:
            raise PermanentError(f"pg_controldata of {old.name} has no checkpoint location")
        replayed = wait_replayed(new, final, timeout=replay_timeout)
    promoted = promote_node(new)
    first = canary_write(new, label)
    return SwitchoverResult(old_primary=old.name, new_primary=new.name, final_checkpoint_lsn=final,
                            replayed_lsn=replayed, promote=promoted, first_write=first,
                            unavailable_seconds=time.monotonic() - t_stop)


def rejoin_as_standby(node: Node, primary: Node, *, os_user: str, bindir: str = "auto",
                      timeout: float = 120) -> LagResult:
    """Restart ``node`` (cleanly stopped, same history) as a standby of ``primary`` and wait for it to stream."""
    pgdata = local_pgdata(node)
    if pgdata is None:
        raise PreconditionFailed(f"cannot rejoin {node.name}: its pgdata is not on this host")
    with contextlib.suppress(ServerUnreachable), connection(node.dsn, timeout=3) as conn:
        row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
        if row and not row[0]:
            raise PreconditionFailed(f"{node.name} accepts writes: not turning a primary into a standby")
    stop_server(pgdata, os_user=os_user, bindir=bindir, mode="fast")
    configure_standby(pgdata, primary, node.name, os_user=os_user)
    start_server(pgdata, os_user=os_user, bindir=bindir)
    return wait_for_zero_lag(node, primary, timeout=timeout)
