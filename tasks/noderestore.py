"""Pure logic and adapter: restoring a backup into a configured node's data directory — where it runs, what refuses it, and the node-side checks before anything is touched.

The orchestrating restore flow decides from libpq alone (``plan_node_restore``: the node is known,
its files are reachable here or through its work pool, it does not accept writes); the node's own
host re-checks its data directory (``check_node_pgdata``: no server running, empty, unless the
operator asked to replace it) before it stops anything or moves the old directory aside, where it
is kept. The restore itself is the restore flow's own steps, on whichever host has the files.
"""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import psycopg
from pydantic import BaseModel, ConfigDict, Field

from tasks.config import Config, Node
from tasks.errors import ConfigError, PreconditionFailed
from tasks.failover import NodeState
from tasks.roles import RoleEvent, primary_by_history

# The node's own configuration files, carried from the replaced directory into the restored one.
NODE_CONFIG_FILES = ("postgresql.conf", "pg_hba.conf", "pg_ident.conf", "postgresql.auto.conf")


class NodeRestoreRequest(BaseModel):
    """What the node's host needs to restore (a node-step parameter, as JSON): names and values
    only — never a key or a password; the node's worker has its own config and environment."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    backup: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[0-9A-Za-z][0-9A-Za-z._-]*$")]
    target_time: str | None = None
    target_lsn: str | None = None
    target_name: str | None = None
    target_xid: str | None = None
    start: bool = False
    port: Annotated[int | None, Field(ge=1, le=65535)] = None
    keep_archiving: bool = False
    recovery_timeout: Annotated[float, Field(gt=0, le=7 * 86400)] = 6 * 3600
    tablespace_map: list[str] = []
    replace_existing: bool = False


def find_node(cfg: Config, name: str) -> Node:
    """The node called ``name`` in the config, or a one-line error listing the nodes there are."""
    nodes = [cfg.primary, *cfg.replicas]
    for node in nodes:
        if node.name == name:
            return node
    raise ConfigError(f"node {name!r} is not in the config (its nodes: {', '.join(n.name for n in nodes)})")


def check_node_reachable(node: Node, where: str | None) -> None:
    """The node's data directory is here or behind its work pool (``where``, as tasks.node_steps says)."""
    if where is None:
        raise PreconditionFailed(
            f"node {node.name} has no pgdata in this config and no work_pool: its data directory is "
            "out of reach (give it a work_pool with a worker on its host, or run the restore there)"
        )


def plan_node_restore(
    node: Node,
    where: str | None,
    states: list[NodeState],
    *,
    replace_existing: bool,
    start: bool,
) -> None:
    """Refuse, before anything is touched, a restore into ``node`` that would wreck it or the
    cluster (pure; ``states``: every configured node as libpq saw it just now).

    Never over a node that accepts writes; over a running server only when asked to replace it;
    a started (and so promoted) restore never next to another node that accepts writes.
    """
    check_node_reachable(node, where)
    mine = next((s for s in states if s.name == node.name), None)
    if mine is not None and mine.reachable and mine.in_recovery is False:
        raise PreconditionFailed(
            f"node {node.name} accepts writes (it is the primary, timeline {mine.timeline}): gravl-dr "
            "never restores over a writable primary; fail over first, or stop it yourself"
        )
    if mine is not None and (mine.reachable or mine.answered) and not replace_existing:
        raise PreconditionFailed(
            f"PostgreSQL is running on node {node.name} ({mine.address}"
            f"{', in recovery' if mine.in_recovery else ''}): restoring over it needs --replace-existing "
            "(stops it and keeps its data directory aside)"
        )
    writable = [s.name for s in states if s.name != node.name and s.reachable and s.in_recovery is False]
    if start and writable:
        raise PreconditionFailed(
            f"node {writable[0]} accepts writes: a started restore of {node.name} would promote a second "
            f"writable node (split brain); restore without --start, or stop {writable[0]} first"
        )


class PreparedPgdata(BaseModel):
    """The node's data directory made ready for a restore: what was stopped and kept aside."""

    model_config = ConfigDict(frozen=True)

    pgdata: str
    stopped: str | None = None
    kept_aside: str | None = None
    settings_from: str | None = None  # the kept directory whose configuration files are the node's own


def _accepts_writes(node: Node) -> bool | None:
    """True/False as the running server says; None when it does not answer."""
    from tasks.postgres import ServerUnreachable, connection

    try:
        with connection(node.dsn, timeout=3) as conn:
            conn.execute("SET statement_timeout = '10s'")
            row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
    except (ServerUnreachable, psycopg.Error):
        return None
    return row is not None and not row[0]


def check_node_pgdata(node: Node, *, replace_existing: bool) -> tuple[Path, bool, bool]:
    """On the node's host, before any change: (pgdata, a server runs there, it is not empty).

    Refuses a writable server always, a server whose role cannot be told, and a running server
    or a non-empty directory unless ``replace_existing``."""
    from tasks.pgcluster import postmaster_running

    if not node.pgdata:
        raise PreconditionFailed(f"node {node.name} has no pgdata in this host's config")
    pgdata = Path(node.pgdata).absolute()
    running = postmaster_running(pgdata)
    if running:
        writes = _accepts_writes(node)
        if writes:
            raise PreconditionFailed(
                f"node {node.name}: the server running in {pgdata} accepts writes: gravl-dr never "
                "restores over a writable primary"
            )
        if writes is None:
            raise PreconditionFailed(
                f"node {node.name}: a server runs in {pgdata} but does not answer at its dsn, so "
                "whether it accepts writes cannot be told: stop it first"
            )
        if not replace_existing:
            raise PreconditionFailed(
                f"node {node.name}: a server runs in {pgdata}: restoring over it needs "
                "--replace-existing (stops it and keeps its data directory aside)"
            )
    if pgdata.exists() and not pgdata.is_dir():
        raise PreconditionFailed(f"node {node.name}: {pgdata} exists and is not a directory")
    nonempty = pgdata.is_dir() and any(pgdata.iterdir())
    if nonempty and not replace_existing:
        raise PreconditionFailed(
            f"node {node.name}: data directory {pgdata} is not empty: restoring over it needs "
            "--replace-existing (keeps the old directory aside)"
        )
    if not pgdata.exists() and not pgdata.parent.is_dir():
        raise PreconditionFailed(f"node {node.name}: parent directory of {pgdata} does not exist")
    return pgdata, running, nonempty


def aside_path(pgdata: Path, now: datetime | None = None) -> Path:
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    path = pgdata.with_name(f"{pgdata.name}.gravl-dr-before-restore-{stamp}")
    n = 1
    while path.exists():
        n += 1
        path = pgdata.with_name(f"{pgdata.name}.gravl-dr-before-restore-{stamp}-{n}")
    return path


def prepare_node_pgdata(cfg: Config, node: Node, *, replace_existing: bool) -> PreparedPgdata:
    """Check, then (only when asked) stop the node's standby and move its data directory aside.

    Nothing is deleted: the old directory is renamed next to the new one and its path reported."""
    from tasks.topology import clear_stale_pidfile, stop_server, wait_server_gone

    pgdata, running, nonempty = check_node_pgdata(node, replace_existing=replace_existing)
    stopped = None
    if running:
        ctl = stop_server(pgdata, os_user=cfg.postgres.os_user, bindir=cfg.postgres.bindir, mode="fast")
        wait_server_gone(pgdata)
        clear_stale_pidfile(pgdata)
        stopped = f"stopped its server (control file: {ctl.get('Database cluster state')})"
    if not nonempty:
        return PreparedPgdata(pgdata=str(pgdata), stopped=stopped)
    # A directory without global/pg_control is a restore that was killed midway (restore moves
    # pg_control into place last): its configuration files are the backup's, not the node's.
    own = (pgdata / "global" / "pg_control").is_file()
    earlier = [d for d in kept_before_restore(pgdata) if (d / "global" / "pg_control").is_file()]
    aside = aside_path(pgdata)
    pgdata.rename(aside)  # same parent, same filesystem: atomic, nothing copied
    settings_from = str(aside) if own else (str(earlier[-1]) if earlier else None)
    return PreparedPgdata(
        pgdata=str(pgdata), stopped=stopped, kept_aside=str(aside), settings_from=settings_from
    )


def kept_before_restore(pgdata: Path) -> list[Path]:
    """The node's directories earlier restores kept aside, oldest first (their names sort by time)."""
    return sorted(p for p in pgdata.parent.glob(pgdata.name + ".gravl-dr-before-restore-*") if p.is_dir())


def carry_node_settings(prepared: PreparedPgdata, *, os_user: str) -> list[str]:
    """Copy the node's own configuration files (port, listen_addresses, pg_hba ...) from the
    replaced directory into the restored one: they belong to the host, not to the backup.
    Recovery settings are written after this, over what the old postgresql.auto.conf said."""
    from tasks.pgcluster import chown_tree

    if prepared.settings_from is None:
        return []
    old, new = Path(prepared.settings_from), Path(prepared.pgdata)
    carried = []
    for name in NODE_CONFIG_FILES:
        if (old / name).is_file():
            shutil.copy2(old / name, new / name)
            chown_tree(new / name, os_user)
            carried.append(name)
    return carried


def restore_role_event(
    history: list[RoleEvent],
    configured_primary: str,
    node: str,
    *,
    timeline: int | None,
    backup_id: str,
    at: datetime,
) -> RoleEvent | None:
    """The role change a started (so promoted) restore into ``node`` makes, for the history that
    `gravl-dr guard` and every flow read (pure): none when the history already names it primary;
    else ``node`` is the primary and the one the history named is demoted, so that, when it comes
    back, the guard keeps it a standby instead of a second writable node."""
    current = primary_by_history(history, configured_primary)
    if current == node:
        return None
    return RoleEvent(
        at=at,
        event="restore",
        primary=node,
        demoted=[current],
        timeline=timeline,
        note=f"backup {backup_id} restored into {node} and promoted",
    )
