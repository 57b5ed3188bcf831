"""Orchestration: the node-step flow (one node-local step on the node's own worker) and how the failover and failback flows call it.

The failover and failback flows run anywhere and talk to the nodes through libpq; what needs a
node's data directory (fence by stopping, stop, rebuild, start as a standby, ...) runs where the
plan says: in-process when this host's config has the node's pgdata, else as a run of the
`node-step/<work_pool>` deployment, picked up by the worker on the node's host. Its outcome comes
back through the repository (tasks.node_steps); a run that crashed, was killed, or was never
picked up is never read as a success.
"""

from __future__ import annotations

import contextlib
import socket
import time
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import Field, ValidationError

from flows.common import logger
from flows.heartbeat import send_heartbeat
from flows.node_watch import PoolWatcher, give_up_run
from flows.params import ConfigPath, OptionalText
from tasks.config import Config, Node, load_config
from tasks.errors import ConfigError, DRError, PermanentError, TransientError, one_line
from tasks.failover import NodeState
from tasks.node_steps import (
    HERE,
    NodeStepArgs,
    NodeStepName,
    NodeStepResult,
    describe_location,
    failed_result,
    raise_for_result,
    read_step_result,
    run_node_step,
    step_location,
    write_step_result,
)
from tasks.polling import poll_until
from tasks.topology import observe_node


@flow(name="node-step", log_prints=False, on_running=[send_heartbeat])
def node_step_flow(
    step: NodeStepName,
    node: Annotated[str, Field(min_length=1, max_length=200)],
    source: OptionalText = None,
    role: Literal["primary", "replica"] = "replica",
    timeline: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0,
    fork_lsn: OptionalText = None,
    end_lsn: OptionalText = None,
    clean: bool = True,
    restore: OptionalText = None,
    fence_ahead: OptionalText = None,
    config_path: ConfigPath = None,
) -> NodeStepResult:
    """Run one node-local step on this node's host; the failover and failback flows start it.

    Args:
        step: The step: observe, fence, stop-for-rebuild, save-local-settings, keep-old-wal,
            rewind, reclone, start-as-standby, discard-old-data, finish-rebuild, stop-cleanly,
            restart-as-standby, restore.
        node: The node (its name in the config); this worker's config must have its pgdata.
        source: The node to rebuild from or to follow as a standby (rewind, reclone,
            start-as-standby, restart-as-standby).
        role: observe: whether the node is the configured primary or a replica.
        timeline: keep-old-wal: the timeline of the WAL that never reached the new primary.
        fork_lsn: keep-old-wal: where the new primary's history left that timeline.
        end_lsn: keep-old-wal: how far the node's own WAL goes.
        clean: fence: a clean (fast) shutdown; untick for an immediate one.
        restore: restore: what to restore, as the restore flow passes it (JSON: backup id,
            recovery target, start, replace_existing; names and values, never a secret).
        fence_ahead: observe (from the failover flow): the planner's other inputs, as JSON; the
            node is fenced in the same run when the failover plan would fence it first.
        config_path: The gravl-dr config file; empty: $GRAVL_DR_CONFIG of the worker, then
            gravl-dr.yaml in its working directory.
    """
    from prefect.runtime import flow_run

    from tasks.repository import open_repository

    cfg = load_config(config_path)
    repo = open_repository(cfg.repository)
    run_id = str(flow_run.id) if flow_run.id else ""
    args = NodeStepArgs(
        source=source,
        role=role,
        timeline=timeline or None,
        fork_lsn=fork_lsn,
        end_lsn=end_lsn,
        clean=clean,
        fence_ahead=fence_ahead,
    )
    step_task = task(name=step, cache_policy=NO_CACHE)(run_node_step)
    try:
        if step == "restore":
            result = _restore_here(cfg, repo, node, restore, config_path)
        else:
            result = step_task(cfg, node, step, args)
    except BaseException as exc:
        if run_id:
            with contextlib.suppress(DRError):
                write_step_result(repo, run_id, failed_result(step, node, exc))
        raise
    get_run_logger().info("%s on %s: %s", step, node, result.detail)
    if run_id:
        write_step_result(repo, run_id, result)
    return result


def _restore_here(
    cfg: Config, repo: Any, node_name: str, request: str | None, config_path: str | None
) -> NodeStepResult:
    """The restore step: the restore flow's own steps, on this node's host (flows.restore)."""
    from flows.restore import restore_on_node_here
    from tasks.noderestore import NodeRestoreRequest, find_node

    try:
        req = NodeRestoreRequest.model_validate_json(request or "")
    except ValidationError as exc:
        raise ConfigError(f"restore step: unreadable request ({one_line(exc)})") from None
    report = restore_on_node_here(cfg, repo, find_node(cfg, node_name), req, config_path)
    return NodeStepResult(
        step="restore",
        node=node_name,
        ok=True,
        detail=f"restored {report.backup_id} into {report.target}",
        payload=report.model_dump(mode="json"),
        host=socket.gethostname(),
        at=datetime.now(UTC),
    )


# ------------------------------------------------------------------------------ the calling side


def call_node_step(
    cfg: Config,
    node: Node,
    step: NodeStepName,
    args: NodeStepArgs | None = None,
    *,
    where: str | None,
    pickup_timeout: float | None = None,
    step_timeout: float | None = None,
) -> NodeStepResult:
    """Run ``step`` for ``node`` where the plan says: in-process (``here``) or on its work pool
    (``step_timeout``: how long it may run once picked up; default node_steps.timeout_seconds)."""
    args = args or NodeStepArgs()
    if where == HERE:
        return run_node_step(cfg, node.name, step, args)
    if not where or not where.startswith("pool:"):
        raise PermanentError(
            f"{node.name}: {step} needs its data directory, which is {describe_location(where)}"
        )
    return _run_on_pool(
        cfg,
        node,
        step,
        args,
        where,
        pickup_timeout or cfg.node_steps.pickup_timeout_seconds,
        step_timeout or cfg.node_steps.timeout_seconds,
    )


def _run_on_pool(
    cfg: Config,
    node: Node,
    step: str,
    args: NodeStepArgs,
    where: str,
    pickup_timeout: float,
    step_timeout: float,
) -> NodeStepResult:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from tasks.repository import open_repository

    pool = where.removeprefix("pool:")
    name = f"node-step/{pool}"
    params: dict[str, Any] = {"step": step, "node": node.name, **_step_params(args)}
    try:
        run: Any = run_deployment(name, parameters=params, timeout=0, tags=["gravl-dr", "node-step"])
    except Exception as exc:  # noqa: BLE001 - ObjectNotFound, an unreachable API: one line for the report
        raise PermanentError(
            f"{node.name}: cannot start {step} on work pool {pool}: deployment {name} ({one_line(exc)})"
        ) from None
    logger().info("%s on %s: run %s on work pool %s", step, node.name, run.name, pool)
    with get_client(sync_client=True) as client:
        watch = PoolWatcher(client, pool, cfg.node_steps.worker_lost_seconds)
        state = _wait_state(client, run.id, lambda s: s.type.value != "SCHEDULED", pickup_timeout, watch)
        if state is None or state.type.value == "SCHEDULED":
            with contextlib.suppress(Exception):
                client.delete_flow_run(run.id)  # never let a stale stop or rebuild run later
            lost = watch.check()
            raise TransientError(
                f"{node.name}: no worker of work pool {pool} picked up {step} "
                + (f"({lost})" if lost else f"within {pickup_timeout:.0f}s")
                + f" (is `prefect worker start --pool {pool}` running on {node.name}'s host?)"
            )
        state = _wait_state(client, run.id, lambda s: s.is_final(), step_timeout, watch)
        lost = None if state is not None and state.is_final() else watch.check()
        if lost:
            give_up_run(client, run.id, lost)
            logger().error("%s: %s (run %s): its worker is gone: %s", node.name, step, run.name, lost)
            raise TransientError(
                f"{node.name}: {step} (run {run.name}) outcome unknown, treated as not done: {lost}; "
                "the run is marked Crashed so no worker starts or finishes it later"
            )
    if state is None or not state.is_final():
        raise TransientError(
            f"{node.name}: {step} (run {run.name}, work pool {pool}) still not finished after "
            f"{step_timeout:.0f}s: its outcome is unknown"
        )
    result = read_step_result(open_repository(cfg.repository), str(run.id))
    if result is None:
        raise PermanentError(
            f"{node.name}: {step} (run {run.name}, work pool {pool}) ended {state.name} with no recorded "
            f"outcome{': ' + one_line(Exception(state.message)) if state.message else ''}: treated as failed"
        )
    if result.ok and not state.is_completed():
        raise PermanentError(f"{node.name}: {step} (run {run.name}) recorded success but ended {state.name}")
    return raise_for_result(result, where)


def _wait_state(client: Any, run_id: Any, done: Any, timeout: float, watch: PoolWatcher) -> Any:
    """The run's state once ``done``; or the last state seen at the timeout or when the pool is lost."""
    last: list[Any] = [None]

    def check() -> bool:
        with contextlib.suppress(Exception):  # a blip of the API: ask again
            last[0] = client.read_flow_run(run_id).state
        if last[0] is not None and bool(done(last[0])):
            return True
        return watch.check() is not None

    poll_until(check, timeout=timeout, interval=0.5)
    return last[0]


def _step_params(args: NodeStepArgs) -> dict[str, Any]:
    out: dict[str, Any] = {"role": args.role, "clean": args.clean}
    if args.source:
        out["source"] = args.source
    if args.timeline is not None:
        out["timeline"] = args.timeline
    if args.fork_lsn:
        out["fork_lsn"] = args.fork_lsn
    if args.end_lsn:
        out["end_lsn"] = args.end_lsn
    if args.restore:
        out["restore"] = args.restore
    if args.fence_ahead:
        out["fence_ahead"] = args.fence_ahead
    return out


def observe(
    cfg: Config,
    node: Node,
    role: Literal["primary", "replica"],
    *,
    attempts: int = 1,
    facts: bool,
    fence_ahead: str | None = None,
    reported: dict[str, Any] | None = None,
) -> NodeState:
    """Observe ``node`` over libpq (with its data directory when it is here), and ask its own worker
    for its data directory's facts when they are needed (``facts``) or it does not answer.
    ``fence_ahead`` goes with that question (the worker may fence in the same run); what the
    worker reported besides the state (its fence) is put in ``reported``."""
    where = step_location(node)
    state = observe_node(
        node,
        role,
        os_user=cfg.postgres.os_user,
        bindir=cfg.postgres.bindir,
        attempts=attempts,
        connect_timeout=3,
    )
    if where is None or where == HERE or not (facts or not state.reachable):
        return state.model_copy(update={"runs_on": where})
    t0 = time.monotonic()
    try:
        res = call_node_step(
            cfg,
            node,
            "observe",
            NodeStepArgs(role=role, fence_ahead=fence_ahead),
            where=where,
            pickup_timeout=cfg.node_steps.observe_timeout_seconds,
        )
    except DRError as exc:
        # Its host (or worker) is gone: what libpq saw is all we know, and its files are out of reach.
        logger().warning("%s: its worker did not report: %s", node.name, one_line(exc))
        note = f"{state.error or 'no answer'}; its worker did not report: {one_line(exc)}"
        return state.model_copy(update={"runs_on": None, "error": note})
    remote = NodeState.model_validate(res.payload)
    if reported is not None:
        reported.update(res.payload)
    logger().info(
        "%s: observed by its worker in %.1fs: %s", node.name, time.monotonic() - t0, remote.evidence()
    )
    return remote.model_copy(update={"runs_on": where})
