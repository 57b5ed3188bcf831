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

from tasks import pgcluster
from tasks.config import Config, Node
from tasks.errors import CommandFailed, DRError, PermanentError, PreconditionFailed, TransientError, one_line
from tasks.failover import READY_PHASES, REWIND_SAFE_STATES, NodeState, server_answered
from tasks.libpq import client_env
from tasks.node_steps import step_location
from tasks.pgcluster import chown_tree, postmaster_running, start_server
from tasks.polling import Progress, poll_until
from tasks.postgres import ServerUnreachable, connection, dsn_field
from tasks.proc import pg_bin, run
from tasks.repository import Repository
from tasks.roles import PrimaryChoice, choose_primary, role_history
from tasks.walnames import WAL_SEGMENT_RE, format_lsn, lsn_or_none, lsn_to_int

log = logging.getLogger(__name__)

FENCE_MARKER = "gravl-dr.fenced"
# Node-local configuration that pg_rewind and pg_basebackup would overwrite with the source's.
LOCAL_CONFIG_FILES = ("postgresql.conf", "pg_hba.conf", "pg_ident.conf", "postgresql.auto.conf")


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
        raise PreconditionFailed(
            f"processes {pids} still run in {pgdata} {timeout:.0f}s after the postmaster stopped"
        )


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
    proc = run(
        [pg_bin("pg_controldata", bindir), "-D", str(pgdata)],
        timeout=30,
        os_user=os_user,
        env={"LC_ALL": "C"},
    )
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
        proc = run(
            [pg_bin("pg_waldump", bindir), "-p", str(wal_dir), name],
            timeout=60,
            os_user=os_user,
            check=False,
            env={"LC_ALL": "C"},
        )
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
       (SELECT system_identifier::text FROM pg_control_system()),
       current_setting('wal_log_hints') = 'on' OR current_setting('data_checksums') = 'on'
"""


def observe_configured_nodes(cfg: Config) -> list[NodeState]:
    """Every configured node as libpq sees it now (no local files): who runs, who accepts writes."""
    return [
        observe_node(
            n,
            "primary" if n is cfg.primary else "replica",
            os_user=cfg.postgres.os_user,
            bindir=cfg.postgres.bindir,
            connect_timeout=3,
            local_facts=False,
        )
        for n in [cfg.primary, *cfg.replicas]
    ]


def find_primary(cfg: Config, repo: Repository | None = None) -> tuple[Config, PrimaryChoice]:
    """Ask every configured node who it is; the config with the node that accepts writes as primary.

    Raises SplitBrain when two nodes are out of recovery. With nobody writable the role history
    (when ``repo`` is given and readable) names the node, else the configured primary stays.
    """
    states = observe_configured_nodes(cfg)
    history = []
    if repo is not None and not any(s.accepts_writes for s in states):
        try:
            history = role_history(repo)
        except DRError as exc:
            log.warning("role history unreadable: %s", one_line(exc))
    choice = choose_primary(states, cfg.primary.name, history)
    return config_with_primary(cfg, choice.primary), choice


def config_with_primary(cfg: Config, name: str) -> Config:
    """The same config with node ``name`` as its primary and every other node as a replica."""
    if name == cfg.primary.name:
        return cfg
    nodes = [cfg.primary, *cfg.replicas]
    primary = next(n for n in nodes if n.name == name)
    return cfg.model_copy(update={"primary": primary, "replicas": [n for n in nodes if n.name != name]})


def parse_history(text: str) -> list[tuple[int, str]]:
    """A timeline history file's lines ("1\t0/3000060\tno recovery target specified") as pairs."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit() and lsn_or_none(parts[1]) is not None:
            out.append((int(parts[0]), parts[1]))
    return out


def _read_history(conn: psycopg.Connection[Any], timeline: int) -> list[tuple[int, str]]:
    if timeline <= 1:
        return []
    try:
        row = conn.execute("SELECT pg_read_file(%s)", (f"pg_wal/{timeline:08X}.history",)).fetchone()
    except psycopg.Error:
        return []
    return parse_history(str(row[0])) if row and row[0] else []


def observe_node(
    node: Node,
    role: str,
    *,
    os_user: str = "postgres",
    bindir: str = "auto",
    attempts: int = 1,
    connect_timeout: int = 3,
    interval: float = 0.25,
    local_facts: bool = True,
) -> NodeState:
    """Look at one node: over SQL when it answers, else at its local data directory if any
    (``local_facts=False``: SQL only, for flows that only need to know who the primary is)."""
    error: str | None = None
    answered = False
    row = None
    history: list[tuple[int, str]] = []
    for attempt in range(attempts):
        try:
            with connection(node.dsn, timeout=connect_timeout) as conn:
                conn.execute("SET statement_timeout = '10s'")
                row = conn.execute(_OBSERVE).fetchone()
                history = _read_history(conn, int(row[10] or 1)) if row and not row[0] else []
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
    base: dict[str, object] = {
        "name": node.name,
        "configured_role": role,
        "address": node_address(node),
        "local_pgdata": pgdata is not None,
    }
    if pgdata is not None:
        base["fenced"] = (pgdata / FENCE_MARKER).exists()
        base["postmaster_running"] = postmaster_running(pgdata)
    if node.pgdata and Path(node.pgdata).parent.is_dir():
        configured = Path(node.pgdata)
        base["rebuild_phase"] = rebuild_phase(configured)
        base["kept_old_data"] = [str(d) for d in old_data_dirs(configured)]
        if base["rebuild_phase"] == "moved-aside":
            base["local_pgdata"] = True  # an interrupted re-clone: the directory is ours to finish
    if row is not None:
        in_recovery = bool(row[0])
        timeline = row[10] if not in_recovery else (row[9] or row[11])
        return NodeState.model_validate(
            {
                **base,
                "reachable": True,
                "in_recovery": in_recovery,
                "read_only": bool(row[1]),
                "current_lsn": row[2],
                "receive_lsn": row[3],
                "replay_lsn": row[4],
                "replay_lag_seconds": float(row[5]) if row[5] is not None else None,
                "replay_paused": bool(row[6]),
                "wal_receiver": row[7],
                "upstream": row[8],
                "timeline": int(timeline) if timeline is not None else None,
                "system_identifier": row[12],
                "rewind_capable": bool(row[13]),
                "history": history,
            }
        )
    extra: dict[str, object] = {}
    if pgdata is not None and local_facts and not base.get("postmaster_running"):
        extra = _stopped_server_facts(node, pgdata, os_user=os_user, bindir=bindir)
    return NodeState.model_validate(
        {**base, "reachable": False, "error": error, "answered": answered, **extra}
    )


def _stopped_server_facts(node: Node, pgdata: Path, *, os_user: str, bindir: str) -> dict[str, object]:
    """A dead server's own files: how far its WAL got (the RPO reference) and how it stopped."""
    try:
        ctl = controldata(pgdata, os_user=os_user, bindir=bindir)
        tli = ctl.get("Latest checkpoint's TimeLineID")
        return {
            "control_state": ctl.get("Database cluster state"),
            "checkpoint_lsn": ctl.get("Latest checkpoint location"),
            "system_identifier": ctl.get("Database system identifier"),
            "timeline": int(tli) if tli and tli.isdigit() else None,
            "last_local_lsn": last_local_wal_lsn(pgdata, os_user=os_user, bindir=bindir),
            "rewind_capable": rewind_possible(ctl),
        }
    except DRError as exc:
        log.warning("could not read %s's data directory: %s", node.name, one_line(exc))
        return {}


def observe_primary(cfg: Config) -> NodeState:
    """The configured primary as failover judges it: three attempts (a restart is not an outage).

    Over libpq and the local data directory only; where its node steps would run is recorded
    (the flow also asks the node's own worker when it does not answer).
    """
    state = observe_node(
        cfg.primary,
        "primary",
        os_user=cfg.postgres.os_user,
        bindir=cfg.postgres.bindir,
        attempts=3,
        connect_timeout=3,
    )
    return state.model_copy(update={"runs_on": step_location(cfg.primary)})


def observe_replicas(cfg: Config) -> list[NodeState]:
    """Every configured replica as failover judges it (two attempts each)."""
    return [
        observe_node(
            r,
            "replica",
            os_user=cfg.postgres.os_user,
            bindir=cfg.postgres.bindir,
            attempts=2,
            connect_timeout=3,
        ).model_copy(update={"runs_on": step_location(r)})
        for r in cfg.replicas
    ]


# ---------------------------------------------------------------------------------------------
# Server control through pg_ctl (local data directories only)


def stop_server(
    pgdata: Path, *, os_user: str, bindir: str = "auto", mode: str = "fast", timeout: int = 60
) -> dict[str, str]:
    """Stop a local server (no-op when it is down) and return its control data afterwards."""
    pgcluster.stop_server(pgdata, os_user=os_user, bindir=bindir, mode=mode, timeout=timeout)
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
    (pgdata / FENCE_MARKER).write_text(
        json.dumps({"fenced_at": datetime.now(UTC).isoformat(), "by": "gravl-dr", "reason": reason}) + "\n"
    )
    chown_tree(pgdata / "standby.signal", os_user)
    chown_tree(pgdata / FENCE_MARKER, os_user)


def fence_by_stop(node: Node, *, os_user: str, bindir: str = "auto", clean: bool = True) -> FenceResult:
    """Stop the old primary (if it runs) and mark its data directory so a restart comes up read-only.

    A node-local step: it needs the node's data directory on this host.
    """
    pgdata = node_pgdata(node)
    was_running = postmaster_running(pgdata)
    if was_running:
        try:
            stop_server(
                pgdata, os_user=os_user, bindir=bindir, mode="fast" if clean else "immediate", timeout=30
            )
        except CommandFailed:
            stop_server(pgdata, os_user=os_user, bindir=bindir, mode="immediate", timeout=30)
    _write_fence_marker(pgdata, os_user, "failover")
    what = (
        "stopped it (clean shutdown)"
        if was_running and clean
        else "stopped it"
        if was_running
        else "it was down"
    )
    return FenceResult(
        node=node.name,
        fenced=True,
        action=f"{what}; placed standby.signal in {pgdata} so a restart comes up read-only",
    )


def fence_read_only(node: Node) -> FenceResult:
    """The soft fence over libpq: default_transaction_read_only=on and its sessions ended."""
    try:
        with connection(node.dsn, timeout=3) as conn:
            conn.execute("SET statement_timeout = '10s'")
            conn.execute("SET lock_timeout = '5s'")
            conn.execute("ALTER SYSTEM SET default_transaction_read_only = on")
            conn.execute("SELECT pg_reload_conf()")
            ended = conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
            ).fetchone()
    except (ServerUnreachable, psycopg.Error) as exc:
        return FenceResult(
            node=node.name, fenced=False, action=f"could not make it read-only: {one_line(exc)}"
        )
    return FenceResult(
        node=node.name,
        fenced=True,
        action=f"made it read-only (default_transaction_read_only=on) and ended "
        f"{ended[0] if ended else 0} session(s); a client can still override it — "
        "stop it when you can",
    )


def not_fenced(node: Node, why: str) -> FenceResult:
    return FenceResult(
        node=node.name,
        fenced=False,
        action=f"NOT fenced: {why} — make sure it cannot come back as a primary (power it off or cut it "
        "from the network)",
    )


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
        "SELECT ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int"
    ).fetchone()
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
        row = conn.execute(
            "SELECT pg_is_in_recovery(), pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text"
        ).fetchone()
        assert row is not None
        if not row[0]:
            tli, switch = _timeline_switchpoint(conn)
            return PromoteResult(
                node=node.name,
                already_primary=True,
                promoted_lsn=switch,
                timeline=tli,
                seconds=time.monotonic() - t0,
            )
        before = max((p for p in (lsn_or_none(row[1]), lsn_or_none(row[2])) if p is not None), default=None)
        try:
            done = conn.execute(
                "SELECT pg_promote(wait => true, wait_seconds => %s)", (wait_seconds,)
            ).fetchone()
        except psycopg.Error as exc:
            raise PermanentError(f"pg_promote failed on {node.name}: {one_line(exc)}") from exc
        if not done or not done[0]:
            raise TransientError(
                f"{node.name} did not finish promoting within {wait_seconds}s; "
                "re-run to check whether it completed"
            )
        tli, switch = _timeline_switchpoint(conn)
    if switch is None and before is not None:
        switch = format_lsn(before)
    return PromoteResult(
        node=node.name,
        already_primary=False,
        promoted_lsn=switch,
        timeline=tli,
        seconds=time.monotonic() - t0,
    )


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
                    " run text NOT NULL, node text NOT NULL)"
                )
                row = conn.execute(
                    "INSERT INTO gravl_dr.failover_canary (run, node) VALUES (%s, %s) "
                    "RETURNING id, written_at",
                    (run_label, node.name),
                ).fetchone()
                assert row is not None
                back = conn.execute(
                    "SELECT run FROM gravl_dr.failover_canary WHERE id = %s", (row[0],)
                ).fetchone()
                lsn = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
            if not back or back[0] != run_label:
                raise PermanentError(f"canary row {row[0]} on {node.name} did not read back")
            return CanaryResult(
                node=node.name,
                row_id=int(row[0]),
                lsn=str(lsn[0]) if lsn else "0/0",
                written_at=row[1],
                seconds=time.monotonic() - t0,
            )
        except (ServerUnreachable, psycopg.OperationalError) as exc:
            last = exc
        except psycopg.Error as exc:
            # read-only transaction, recovery still ending...: worth another try until the deadline
            last = exc
        time.sleep(0.1)
    raise PermanentError(
        f"validation failed: no canary write on {node.name} within {timeout:.0f}s: "
        f"{one_line(last) if last else 'no attempt'}"
    )


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
        kept = [ln for ln in auto.read_text().splitlines() if not re.match(r"\s*primary_conninfo\s*=", ln)]
    value = standby_conninfo(primary, application_name).replace("'", "''")
    kept.append(f"primary_conninfo = '{value}'")
    auto.write_text("\n".join(kept) + "\n")
    (pgdata / "standby.signal").touch()
    with contextlib.suppress(FileNotFoundError):
        (pgdata / FENCE_MARKER).unlink()
    chown_tree(auto, os_user)
    chown_tree(pgdata / "standby.signal", os_user)


def clone_standby(
    source: Node, pgdata: Path, *, os_user: str, bindir: str = "auto", timeout: int = 3600
) -> None:
    """pg_basebackup a fresh copy of ``source`` into the empty directory ``pgdata``."""
    pgdata.mkdir(parents=True, exist_ok=True)
    pgdata.chmod(0o700)
    chown_tree(pgdata, os_user)
    env = client_env(source.dsn, dbname="postgres")
    run(
        [pg_bin("pg_basebackup", bindir), "-D", str(pgdata), "-X", "stream", "-c", "fast", "--no-sync"],
        timeout=timeout,
        os_user=os_user,
        env=env,
    )


class RebuildResult(Frozen):
    node: str
    method: (
        str  # "pg_rewind", "pg_rewind (no rewind required)", "pg_basebackup re-clone", "started as standby"
    )
    seconds: float
    detail: str
    old_data: str | None = None  # where the old data directory (or its divergent WAL) was kept
    old_data_bytes: int | None = None


def rewind_possible(ctl: dict[str, str]) -> bool:
    """pg_rewind needs hint bits WAL-logged: wal_log_hints=on or data checksums (pg_rewind docs)."""
    return ctl.get("wal_log_hints setting") == "on" or ctl.get("Data page checksum version", "0") != "0"


# A rebuild's progress, recorded in the node's own data directory (and next to it) so that a run
# killed at any point is resumed from what is on disk, never from a guess:
#   <pgdata>/gravl-dr.rebuild        {"phase": "rewinding" | "rewind-failed" | "rewound" | "cloned"}
#   <pgdata>.gravl-dr-local-conf/    the node's own configuration files, saved before anything
#                                    overwrites them (pg_rewind and pg_basebackup copy the source's)
#   <pgdata>.gravl-dr-cloning        a re-clone in progress (only the source's data: safe to delete)
#   <pgdata>.gravl-dr-old-<stamp>/   the old data directory, or its un-replicated WAL, kept
REBUILD_MARKER = "gravl-dr.rebuild"


def rebuild_phase(pgdata: Path) -> str | None:
    """The phase recorded in the data directory; "moved-aside" when only the kept old copy is left."""
    try:
        return str(json.loads((pgdata / REBUILD_MARKER).read_text())["phase"])
    except FileNotFoundError:
        pass
    except (ValueError, KeyError, TypeError):
        return "rewinding"  # unreadable marker: assume the worst (an interrupted rewind)
    if not (pgdata / "PG_VERSION").exists() and (old_data_dirs(pgdata) or cloning_dir(pgdata).exists()):
        return "moved-aside"
    return None


def _set_phase(pgdata: Path, phase: str, os_user: str, **extra: str) -> None:
    tmp = pgdata / (REBUILD_MARKER + ".tmp")
    tmp.write_text(json.dumps({"phase": phase, "at": datetime.now(UTC).isoformat(), **extra}) + "\n")
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    tmp.replace(pgdata / REBUILD_MARKER)
    chown_tree(pgdata / REBUILD_MARKER, os_user)


def local_conf_dir(pgdata: Path) -> Path:
    return pgdata.with_name(pgdata.name + ".gravl-dr-local-conf")


def cloning_dir(pgdata: Path) -> Path:
    return pgdata.with_name(pgdata.name + ".gravl-dr-cloning")


def old_data_dirs(pgdata: Path) -> list[Path]:
    return sorted(p for p in pgdata.parent.glob(pgdata.name + ".gravl-dr-old-*") if p.is_dir())


def dir_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def stop_for_rebuild(node: Node, *, os_user: str, bindir: str = "auto") -> str:
    """Stop the node (a standby by now) so its files can be rebuilt; refuse if it accepts writes."""
    pgdata = node_pgdata(node)
    with contextlib.suppress(ServerUnreachable), connection(node.dsn, timeout=3) as conn:
        row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
        if row and not row[0]:
            raise PreconditionFailed(f"{node.name} accepts writes: not stopping a primary to rebuild it")
    if not (pgdata / "PG_VERSION").exists():
        return "no data directory in place (a re-clone is under way)"
    ctl = stop_server(pgdata, os_user=os_user, bindir=bindir, mode="fast")
    wait_server_gone(pgdata)
    clear_stale_pidfile(pgdata)
    return f"stopped; control file: {ctl.get('Database cluster state')}"


def node_pgdata(node: Node) -> Path:
    if not node.pgdata:
        raise PreconditionFailed(f"{node.name} has no pgdata in this config: its files are not on this host")
    return Path(node.pgdata)


def save_local_settings(node: Node, *, os_user: str) -> str:
    """Copy the node's own configuration files next to its data directory, once.

    Taken before the first rewind or re-clone and never overwritten afterwards: after an
    interrupted pg_rewind the files in the data directory may already be the source's.
    """
    pgdata = node_pgdata(node)
    saved = local_conf_dir(pgdata)
    if saved.is_dir():
        return f"already saved in {saved}"
    if rebuild_phase(pgdata) is not None:
        raise PreconditionFailed(
            f"{node.name}'s own configuration was not saved before its rebuild "
            f"began ({saved} is missing): restore its settings by hand"
        )
    tmp = saved.with_name(saved.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o700)
    names = [n for n in LOCAL_CONFIG_FILES if (pgdata / n).is_file()]
    for name in names:
        shutil.copy2(pgdata / name, tmp / name)
    tmp.rename(saved)
    chown_tree(saved, os_user)
    return f"{', '.join(names)} saved in {saved}"


def restore_local_settings(pgdata: Path, *, os_user: str) -> list[str]:
    saved = local_conf_dir(pgdata)
    restored = []
    if saved.is_dir():
        for src in sorted(saved.iterdir()):
            shutil.copy2(src, pgdata / src.name)
            chown_tree(pgdata / src.name, os_user)
            restored.append(src.name)
    return restored


def keep_old_wal(
    node: Node, *, timeline: int, fork_lsn: str, end_lsn: str, os_user: str, seg_size: int = 16 * 1024 * 1024
) -> tuple[Path, int]:
    """Copy the WAL segments that hold what the new primary never received, before pg_rewind.

    pg_rewind replaces the target's WAL after the fork point with the source's, so these
    segments (timeline ``timeline``, ``fork_lsn`` to ``end_lsn``) are the only copy left of the
    un-replicated transactions. Returns the folder and its size in bytes.
    """
    from tasks.walnames import segment_name

    pgdata = node_pgdata(node)
    existing = [
        d
        for d in old_data_dirs(pgdata)
        if (d / "gravl-dr-old.json").exists()
        and json.loads((d / "gravl-dr-old.json").read_text()).get("fork_lsn") == fork_lsn
    ]
    if existing:
        return existing[-1], dir_size(existing[-1])
    aside = pgdata.with_name(f"{pgdata.name}.gravl-dr-old-{datetime.now(UTC):%Y%m%dT%H%M%SZ}")
    tmp = aside.with_name(aside.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "pg_wal").mkdir(parents=True)
    first, last = lsn_to_int(fork_lsn) // seg_size, lsn_to_int(end_lsn) // seg_size
    for segno in range(first, last + 1):
        name = segment_name(timeline, segno, seg_size)
        if (pgdata / "pg_wal" / name).is_file():
            shutil.copy2(pgdata / "pg_wal" / name, tmp / "pg_wal" / name)
    for hist in (pgdata / "pg_wal").glob("*.history"):
        shutil.copy2(hist, tmp / "pg_wal" / hist.name)
    (tmp / "gravl-dr-old.json").write_text(
        json.dumps(
            {
                "node": node.name,
                "timeline": timeline,
                "fork_lsn": fork_lsn,
                "end_lsn": end_lsn,
                "kept_at": datetime.now(UTC).isoformat(),
                "what": "WAL segments of the un-replicated transactions",
            }
        )
        + "\n"
    )
    tmp.rename(aside)
    chown_tree(aside, os_user)
    return aside, dir_size(aside)


class RewindFailed(PermanentError):
    """pg_rewind failed: the target directory is not usable; the plan re-clones it."""


def rewind_node(
    node: Node, source: Node, *, os_user: str, bindir: str = "auto", timeout: int = 3600
) -> RebuildResult:
    """pg_rewind the stopped ``node`` onto ``source``'s timeline; the marker brackets the run.

    PostgreSQL 13+ pg_rewind brings a crashed target to a consistent state itself (single-user
    recovery on the target's own, diverged timeline, before it computes what to copy), so we
    never start the old primary ourselves. A run killed in the middle leaves the marker at
    "rewinding": the next plan re-clones instead of trusting a half-rewritten directory.
    """
    t0 = time.monotonic()
    pgdata = node_pgdata(node)
    if postmaster_running(pgdata) or server_processes(pgdata):
        raise PreconditionFailed(f"{node.name} is running: stop it before pg_rewind")
    phase = rebuild_phase(pgdata)
    if phase is not None:
        raise PreconditionFailed(f"{node.name}'s data directory is in rebuild phase {phase!r}: not rewinding")
    if not local_conf_dir(pgdata).is_dir():
        raise PreconditionFailed(f"{node.name}'s own settings are not saved: not rewinding")
    for name in ("standby.signal", "recovery.signal"):  # pg_rewind's single-user recovery refuses them
        with contextlib.suppress(FileNotFoundError):
            (pgdata / name).unlink()
    # pg_rewind (before PostgreSQL 16) takes the source's timeline from its control file, which a
    # just-promoted server updates only at its first checkpoint. Without one it sees "the same
    # timeline" and wrongly says "no rewind required" (the pg_rewind docs' note on promoted sources).
    with connection(source.dsn, timeout=5) as conn:
        conn.execute("CHECKPOINT")
    _set_phase(pgdata, "rewinding", os_user, source=source.name)
    env = client_env(source.dsn, dbname="postgres")
    proc = run(
        [pg_bin("pg_rewind", bindir), "--target-pgdata", str(pgdata), "--source-server", "", "--no-sync"],
        timeout=timeout,
        os_user=os_user,
        env=env,
        check=False,
    )
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        _set_phase(pgdata, "rewind-failed", os_user, source=source.name)
        raise RewindFailed(f"pg_rewind of {node.name} failed: {' | '.join(output.splitlines()[-6:])}")
    _set_phase(pgdata, "rewound", os_user, source=source.name)
    method = "pg_rewind (no rewind required)" if "no rewind required" in output else "pg_rewind"
    return RebuildResult(
        node=node.name,
        method=method,
        seconds=time.monotonic() - t0,
        detail=output.splitlines()[-1] if output else "",
    )


def reclone_node(
    node: Node, source: Node, *, os_user: str, bindir: str = "auto", timeout: int = 3600
) -> RebuildResult:
    """Move the old data directory aside (kept) and pg_basebackup a fresh copy of ``source``.

    Resumable: a re-clone already in place is left alone, a half-made one (only the source's
    data) is started again, and the old directory is moved aside exactly once.
    """
    t0 = time.monotonic()
    pgdata = node_pgdata(node)
    if rebuild_phase(pgdata) == "cloned":
        return RebuildResult(
            node=node.name,
            method="pg_basebackup re-clone",
            seconds=0.0,
            detail="already re-cloned",
            old_data=_newest_old(pgdata),
        )
    if (pgdata / "PG_VERSION").exists() or (pgdata.exists() and any(pgdata.iterdir())):
        if postmaster_running(pgdata) or server_processes(pgdata):
            raise PreconditionFailed(f"{node.name} is running: stop it before re-cloning")
        aside = pgdata.with_name(f"{pgdata.name}.gravl-dr-old-{datetime.now(UTC):%Y%m%dT%H%M%SZ}-datadir")
        pgdata.rename(aside)
    elif pgdata.exists():
        pgdata.rmdir()
    work = cloning_dir(pgdata)
    shutil.rmtree(work, ignore_errors=True)  # an interrupted clone: nothing but the source's data
    clone_standby(source, work, os_user=os_user, bindir=bindir, timeout=timeout)
    _set_phase(work, "cloned", os_user, source=source.name)
    work.rename(pgdata)
    old = _newest_old(pgdata)
    return RebuildResult(
        node=node.name,
        method="pg_basebackup re-clone",
        seconds=time.monotonic() - t0,
        detail=f"fresh copy of {source.name}",
        old_data=old,
        old_data_bytes=dir_size(Path(old)) if old else None,
    )


def _newest_old(pgdata: Path) -> str | None:
    dirs = old_data_dirs(pgdata)
    return str(dirs[-1]) if dirs else None


def start_as_standby(node: Node, source: Node, *, os_user: str, bindir: str = "auto") -> RebuildResult:
    """Restore the node's own settings, point it at ``source`` with standby.signal, start it.

    Only a rewound or re-cloned directory is started, and only in standby mode: it replays the
    new primary's timeline and never writes WAL of its own.
    """
    t0 = time.monotonic()
    pgdata = node_pgdata(node)
    phase = rebuild_phase(pgdata)
    if phase not in READY_PHASES:
        raise PreconditionFailed(
            f"{node.name} is in rebuild phase {phase!r}: only a rewound or re-cloned "
            "data directory is started"
        )
    if postmaster_running(pgdata):
        return RebuildResult(
            node=node.name, method="started as standby", seconds=0.0, detail="already running"
        )
    clear_stale_pidfile(pgdata)
    restored = restore_local_settings(pgdata, os_user=os_user)
    for leftover in ("backup_label.old", FENCE_MARKER):
        with contextlib.suppress(FileNotFoundError):
            (pgdata / leftover).unlink()
    configure_standby(pgdata, source, node.name, os_user=os_user)
    start_server(pgdata, os_user=os_user, bindir=bindir)
    return RebuildResult(
        node=node.name,
        method="started as standby",
        seconds=time.monotonic() - t0,
        detail=f"own settings restored ({', '.join(restored) or 'none saved'}), standby of {source.name}",
    )


def finish_rebuild(pgdata: Path) -> None:
    """After the node was promoted home: the rebuild is over, its bookkeeping goes."""
    with contextlib.suppress(FileNotFoundError):
        (pgdata / REBUILD_MARKER).unlink()
    shutil.rmtree(local_conf_dir(pgdata), ignore_errors=True)


def discard_old_data(node: Node) -> tuple[list[str], int]:
    """Delete the kept old data of ``node`` (only when the operator asked: --discard-old-data)."""
    pgdata = node_pgdata(node)
    dirs = old_data_dirs(pgdata)
    freed = sum(dir_size(d) for d in dirs)
    for d in dirs:
        shutil.rmtree(d)
    return [str(d) for d in dirs], freed


def rebuild_as_standby(
    node: Node,
    source: Node,
    *,
    os_user: str,
    bindir: str = "auto",
    allow_reclone: bool = True,
    timeout: int = 3600,
) -> RebuildResult:
    """Every rebuild step in one call (tests, benches): stop, save settings, rewind else re-clone, start."""
    pgdata = node_pgdata(node)
    stop_for_rebuild(node, os_user=os_user, bindir=bindir)
    phase = rebuild_phase(pgdata)
    result: RebuildResult | None = None
    if phase is None:
        save_local_settings(node, os_user=os_user)
        ctl = controldata(pgdata, os_user=os_user, bindir=bindir)
        if rewind_possible(ctl) and ctl.get("Database cluster state") in REWIND_SAFE_STATES:
            with contextlib.suppress(RewindFailed):
                result = rewind_node(node, source, os_user=os_user, bindir=bindir, timeout=timeout)
        phase = rebuild_phase(pgdata)
    if phase not in READY_PHASES:
        if not allow_reclone:
            raise PreconditionFailed(f"cannot rebuild {node.name} without a re-clone")
        result = reclone_node(node, source, os_user=os_user, bindir=bindir, timeout=timeout)
    started = start_as_standby(node, source, os_user=os_user, bindir=bindir)
    return result or started


class LagResult(Frozen):
    standby: str
    primary_lsn: str
    replay_lsn: str
    seconds: float


def wait_for_zero_lag(
    standby: Node, primary: Node, *, timeout: float = 300, interval: float = 0.5
) -> LagResult:
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
                    return LagResult(
                        standby=standby.name,
                        primary_lsn=prow[0],
                        replay_lsn=srow[0],
                        seconds=progress.elapsed(),
                    )
                behind = f", {lsn_to_int(prow[0]) - lsn_to_int(srow[0])} bytes behind" if srow[0] else ""
                last = (
                    f"{primary.name} at {prow[0]}, {standby.name} replayed {srow[0] or '-'}{behind}, "
                    f"receiver {srow[1] or 'not running'}"
                )
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
    raise TransientError(
        f"{standby.name} did not catch up with {primary.name} within {timeout:.0f}s ({last})"
    )


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
    raise PermanentError(
        f"{standby.name} replayed only up to {last}, not past {lsn} within "
        f"{timeout:.0f}s: promoting it would lose data"
    )


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


class CleanStop(Frozen):
    """A clean shutdown of the primary being switched away from, as its own host saw it."""

    node: str
    control_state: str | None
    final_checkpoint_lsn: str | None
    stopping_at: datetime  # wall clock when the shutdown began (the start of write unavailability)


def in_recovery(node: Node) -> bool:
    with connection(node.dsn, timeout=3) as conn:
        row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
    return bool(row and row[0])


def stop_cleanly(node: Node, *, os_user: str, bindir: str = "auto") -> CleanStop:
    """The node-local half of a switchover: CHECKPOINT (so the shutdown one is short), then a fast shutdown.

    A clean ("fast") shutdown makes the walsenders send everything up to and including the
    shutdown checkpoint before the server exits (walsender.c WalSndDone).
    """
    pgdata = node_pgdata(node)
    if postmaster_running(pgdata):
        with contextlib.suppress(DRError, psycopg.Error), connection(node.dsn, timeout=3) as conn:
            conn.execute("SET statement_timeout = '60s'")
            conn.execute("CHECKPOINT")
    stopping_at = datetime.now(UTC)
    ctl = stop_server(pgdata, os_user=os_user, bindir=bindir, mode="fast")
    return CleanStop(
        node=node.name,
        control_state=ctl.get("Database cluster state"),
        final_checkpoint_lsn=ctl.get("Latest checkpoint location"),
        stopping_at=stopping_at,
    )


def promote_after_stop(
    old: Node, new: Node, stop: CleanStop, *, new_was_standby: bool, label: str, replay_timeout: float = 60
) -> SwitchoverResult:
    """The libpq half of a switchover: ``new`` replayed past ``old``'s shutdown checkpoint, promote, first write.

    A streaming standby that has replayed past that record has every committed transaction.
    """
    final: str | None = None
    replayed: str | None = None
    if new_was_standby:
        if stop.control_state != "shut down":
            raise PermanentError(
                f"{old.name} is not cleanly shut down ({stop.control_state}): a zero-loss "
                "switchover is impossible; use failover instead"
            )
        final = stop.final_checkpoint_lsn
        if not final:
            raise PermanentError(f"pg_controldata of {old.name} has no checkpoint location")
        replayed = wait_replayed(new, final, timeout=replay_timeout)
    promoted = promote_node(new)
    first = canary_write(new, label)
    return SwitchoverResult(
        old_primary=old.name,
        new_primary=new.name,
        final_checkpoint_lsn=final,
        replayed_lsn=replayed,
        promote=promoted,
        first_write=first,
        unavailable_seconds=max(0.0, (first.written_at - stop.stopping_at).total_seconds()),
    )


def switch_over(
    old: Node, new: Node, *, os_user: str, bindir: str = "auto", label: str, replay_timeout: float = 60
) -> SwitchoverResult:
    """Zero-loss switchover with both halves on this host: stop ``old`` cleanly, ``new`` replays, promote."""
    new_was_standby = in_recovery(new)
    if not new_was_standby and postmaster_running(node_pgdata(old)):
        raise PreconditionFailed(f"split brain: {old.name} runs and {new.name} is already a primary")
    stop = stop_cleanly(old, os_user=os_user, bindir=bindir)
    return promote_after_stop(
        old, new, stop, new_was_standby=new_was_standby, label=label, replay_timeout=replay_timeout
    )


def restart_as_standby(node: Node, primary: Node, *, os_user: str, bindir: str = "auto") -> str:
    """The node-local half of a rejoin: stop ``node`` (never a primary), point it at ``primary``, start it."""
    pgdata = node_pgdata(node)
    with contextlib.suppress(ServerUnreachable), connection(node.dsn, timeout=3) as conn:
        row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
        if row and not row[0]:
            raise PreconditionFailed(f"{node.name} accepts writes: not turning a primary into a standby")
    stop_server(pgdata, os_user=os_user, bindir=bindir, mode="fast")
    configure_standby(pgdata, primary, node.name, os_user=os_user)
    start_server(pgdata, os_user=os_user, bindir=bindir)
    return f"restarted as a standby of {primary.name}"


def rejoin_as_standby(
    node: Node, primary: Node, *, os_user: str, bindir: str = "auto", timeout: float = 120
) -> LagResult:
    """Restart ``node`` (cleanly stopped, same history) as a standby of ``primary`` and wait for it to stream."""
    restart_as_standby(node, primary, os_user=os_user, bindir=bindir)
    return wait_for_zero_lag(node, primary, timeout=timeout)
