"""Adapter: the node-local steps — the ones that need a node's data directory — as one table, and their recorded outcomes.

Fencing by stopping, stopping for a rebuild, saving the node's own settings, keeping its old WAL,
pg_rewind, re-clone, starting as a standby, a clean stop for a switchover, restarting as a
standby: each is a plain function of (config, node, arguments) that runs where the node's data
directory is. The orchestrating flow runs it in-process when its own config has the node's
pgdata, else as a `node-step/<work_pool>` flow run on the node's worker, whose own config
knows the pgdata. That run's outcome travels through the repository, under a key derived from
the flow-run id: a run that crashed or was killed leaves no outcome, and reads as failed.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from tasks.config import Config, Node
from tasks.errors import (
    AlreadyExists,
    ConfigError,
    DRError,
    NotFound,
    PermanentError,
    PreconditionFailed,
    TransientError,
    is_transient,
    one_line,
)
from tasks.repository import Repository

NodeStepName = Literal[
    "observe",
    "fence",
    "stop-for-rebuild",
    "save-local-settings",
    "keep-old-wal",
    "rewind",
    "reclone",
    "start-as-standby",
    "discard-old-data",
    "finish-rebuild",
    "stop-cleanly",
    "restart-as-standby",
    "restore",  # a backup into the node's data directory: the restore flow's own steps (flows.restore)
]
NODE_STEPS: tuple[str, ...] = NodeStepName.__args__  # type: ignore[attr-defined]

RESULT_PREFIX = "node-steps/"
HERE = "here"  # where a node step runs: "here" (this host), or "pool:<work pool>"


class NodeStepArgs(BaseModel):
    """What a node step needs besides the node: plain values (they become flow parameters)."""

    model_config = ConfigDict(frozen=True)

    source: str | None = None  # the node to rebuild from / point at (a name in the config)
    role: Literal["primary", "replica"] = "replica"  # observe: as what the node is configured
    timeline: int | None = None  # keep-old-wal: the diverged timeline and its LSN range
    fork_lsn: str | None = None
    end_lsn: str | None = None
    clean: bool = True  # fence: a clean (fast) shutdown, else immediate
    restore: str | None = None  # restore: a tasks.noderestore.NodeRestoreRequest as JSON
    fence_ahead: str | None = (
        None  # observe: tasks.failover.FenceAhead (JSON): fence in the same run if planned
    )


class NodeStepResult(BaseModel):
    """One node step's outcome as its host recorded it; ``payload`` is the step's typed result."""

    model_config = ConfigDict(frozen=True)

    step: str
    node: str
    ok: bool
    detail: str = ""
    payload: dict[str, Any] = {}
    error_kind: str | None = None  # the DRError class name when not ok
    transient: bool = False
    host: str = ""
    at: datetime


def step_location(node: Node) -> str | None:
    """Where ``node``'s local steps can run: here (its pgdata is on this host), its work pool, or nowhere."""
    from tasks.topology import local_pgdata

    if local_pgdata(node) is not None:
        return HERE
    if node.pgdata and not node.work_pool:
        return HERE  # configured here but not (yet) a data directory: an interrupted re-clone
    if node.work_pool:
        return f"pool:{node.work_pool}"
    return None


def describe_location(where: str | None) -> str:
    if where is None:
        return "nowhere (no pgdata here, no work pool)"
    if where == HERE:
        return "this host"
    if where.startswith("pool:"):
        return f"work pool {where.removeprefix('pool:')}"
    return f"only reachable over {where}"


def _node(cfg: Config, name: str | None, what: str) -> Node:
    for node in [cfg.primary, *cfg.replicas]:
        if node.name == name:
            return node
    raise ConfigError(f"{what} {name!r} is not a node of this config")


_Step = Callable[[Config, Node, NodeStepArgs], tuple[str, "BaseModel | dict[str, Any]"]]


def _kw(cfg: Config) -> dict[str, Any]:
    return {"os_user": cfg.postgres.os_user, "bindir": cfg.postgres.bindir}


def _observe(cfg: Config, node: Node, args: NodeStepArgs) -> tuple[str, BaseModel | dict[str, Any]]:
    from tasks.topology import observe_node

    state = observe_node(node, args.role, **_kw(cfg), attempts=2, connect_timeout=3)
    if not args.fence_ahead:
        return state.evidence(), state
    from tasks.failover import FenceAhead, fence_ahead
    from tasks.topology import fence_by_stop

    go, why = fence_ahead(state, FenceAhead.model_validate_json(args.fence_ahead))
    fence = fence_by_stop(node, **_kw(cfg), clean=True) if go and node.pgdata else None
    extra = {"fence": fence.model_dump(mode="json") if fence else None, "fence_decision": why}
    return f"{state.evidence()}; {fence.action if fence else why}", {**state.model_dump(mode="json"), **extra}


def _fence(cfg: Config, node: Node, args: NodeStepArgs) -> tuple[str, BaseModel | dict[str, Any]]:
    from tasks.topology import fence_by_stop

    res = fence_by_stop(node, **_kw(cfg), clean=args.clean)
    return res.action, res


def _stop_for_rebuild(cfg: Config, node: Node, args: NodeStepArgs) -> tuple[str, BaseModel | dict[str, Any]]:
    from tasks.topology import stop_for_rebuild

    return stop_for_rebuild(node, **_kw(cfg)), {}


def _save_settings(cfg: Config, node: Node, args: NodeStepArgs) -> tuple[str, BaseModel | dict[str, Any]]:
    from tasks.topology import save_local_settings

    return save_local_settings(node, os_user=cfg.postgres.os_user), {}


def _keep_old_wal(cfg: Config, node: Node, args: NodeStepArgs) -> tuple[str, BaseModel | dict[str, Any]]:
    from tasks.topology import keep_old_wal

    if args.timeline is None or not args.fork_lsn or not args.end_lsn:
        raise PreconditionFailed("keep-old-wal needs timeline, fork_lsn and end_lsn")
    path, size = keep_old_wal(
        node,
        timeline=args.timeline,
        fork_lsn=args.fork_lsn,
        end_lsn=args.end_lsn,
        os_user=cfg.postgres.os_user,
    )
    return f"kept in {path} ({size} bytes)", {"path": str(path), "size": size}


def _rebuild(kind: str) -> _Step:
    def step(cfg: Config, node: Node, args: NodeStepArgs) -> tuple[str, BaseModel | dict[str, Any]]:
        from tasks import topology as t

        source = _node(cfg, args.source, "source")
        fn = {"rewind": t.rewind_node, "reclone": t.reclone_node, "start-as-standby": t.start_as_standby}[
            kind
        ]
        rebuilt = fn(node, source, **_kw(cfg))
        return f"{rebuilt.method} in {rebuilt.seconds:.1f}s ({rebuilt.detail})", rebuilt

    return step


def _restart_as_standby(
    cfg: Config, node: Node, args: NodeStepArgs
) -> tuple[str, BaseModel | dict[str, Any]]:
    from tasks.topology import restart_as_standby

    return restart_as_standby(node, _node(cfg, args.source, "source"), **_kw(cfg)), {}


def _discard(cfg: Config, node: Node, args: NodeStepArgs) -> tuple[str, BaseModel | dict[str, Any]]:
    from tasks.topology import discard_old_data

    removed, freed = discard_old_data(node)
    return f"deleted {len(removed)} kept director(ies)", {"removed": removed, "freed": freed}


def _finish(cfg: Config, node: Node, args: NodeStepArgs) -> tuple[str, BaseModel | dict[str, Any]]:
    from tasks.topology import finish_rebuild, node_pgdata

    finish_rebuild(node_pgdata(node))
    return "rebuild bookkeeping removed", {}


def _stop_cleanly(cfg: Config, node: Node, args: NodeStepArgs) -> tuple[str, BaseModel | dict[str, Any]]:
    from tasks.topology import stop_cleanly

    stop = stop_cleanly(node, **_kw(cfg))
    return f"shut down: {stop.control_state} at {stop.final_checkpoint_lsn}", stop


STEP_FUNCTIONS: dict[str, _Step] = {
    "observe": _observe,
    "fence": _fence,
    "stop-for-rebuild": _stop_for_rebuild,
    "save-local-settings": _save_settings,
    "keep-old-wal": _keep_old_wal,
    "rewind": _rebuild("rewind"),
    "reclone": _rebuild("reclone"),
    "start-as-standby": _rebuild("start-as-standby"),
    "discard-old-data": _discard,
    "finish-rebuild": _finish,
    "stop-cleanly": _stop_cleanly,
    "restart-as-standby": _restart_as_standby,
}


def run_node_step(cfg: Config, node_name: str, step: str, args: NodeStepArgs) -> NodeStepResult:
    """Run one node-local step on this host and return its outcome (errors raise, as DRErrors)."""
    node = _node(cfg, node_name, "node")
    fn = STEP_FUNCTIONS.get(step)
    if fn is None:
        raise ConfigError(f"unknown node step {step!r} (one of {', '.join(NODE_STEPS)})")
    if step != "observe" and not node.pgdata:
        raise PreconditionFailed(f"{node.name} has no pgdata in this host's config: cannot run {step} here")
    detail, payload = fn(cfg, node, args)
    return _ok(step, node, detail, payload)


def _ok(step: str, node: Node, detail: str, payload: BaseModel | dict[str, Any]) -> NodeStepResult:
    data = payload.model_dump(mode="json") if isinstance(payload, BaseModel) else payload
    return NodeStepResult(
        step=step, node=node.name, ok=True, detail=detail, payload=data, host=socket.gethostname(), at=_now()
    )


def failed_result(step: str, node_name: str, exc: BaseException) -> NodeStepResult:
    """What a node step that raised records for the orchestrator (its class drives the re-plan)."""
    return NodeStepResult(
        step=step,
        node=node_name,
        ok=False,
        detail=one_line(exc),
        error_kind=type(exc).__name__,
        transient=is_transient(exc),
        host=socket.gethostname(),
        at=_now(),
    )


def _now() -> datetime:
    return datetime.now(UTC)


def result_key(run_id: str) -> str:
    return f"{RESULT_PREFIX}{run_id}.json"


def write_step_result(repo: Repository, run_id: str, result: NodeStepResult) -> str:
    """Record the outcome once (put-if-absent; the same outcome written again is a success)."""
    key = result_key(run_id)
    data = (result.model_dump_json() + "\n").encode()
    try:
        repo.put_bytes(key, data)
    except AlreadyExists:
        if repo.get_bytes(key) != data:
            raise
    return key


def read_step_result(repo: Repository, run_id: str) -> NodeStepResult | None:
    """The recorded outcome of run ``run_id``, or None when it recorded none (crashed, killed)."""
    try:
        raw = repo.get_bytes(result_key(run_id))
    except NotFound:
        return None
    try:
        return NodeStepResult.model_validate(json.loads(raw))
    except (ValueError, ValidationError) as exc:
        raise PermanentError(
            f"node step outcome {result_key(run_id)} is unreadable: {one_line(exc)}"
        ) from None


def raise_for_result(result: NodeStepResult, where: str) -> NodeStepResult:
    """Re-raise a failed step's error on the orchestrator's side, in its class (RewindFailed re-plans)."""
    if result.ok:
        return result
    from tasks.topology import RewindFailed

    message = f"{result.node} ({describe_location(where)}, host {result.host}): {result.detail}"
    kinds: dict[str, type[DRError]] = {"RewindFailed": RewindFailed, "PreconditionFailed": PreconditionFailed}
    cls = kinds.get(result.error_kind or "") or (TransientError if result.transient else PermanentError)
    raise cls(message)
