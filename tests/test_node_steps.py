"""Node-local steps: where the plan runs each step, how a node step's outcome travels, the config."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tasks.config import parse_config
from tasks.errors import ConfigError, PermanentError, PreconditionFailed, TransientError
from tasks.failover import NodeState, plan_failback, plan_failover
from tasks.node_steps import (
    NodeStepArgs,
    NodeStepResult,
    failed_result,
    raise_for_result,
    read_step_result,
    run_node_step,
    step_location,
    write_step_result,
)
from tasks.repository import FileRepository
from tasks.topology import RewindFailed


def _cfg(**primary: Any) -> Any:
    return parse_config(
        {
            "primary": {"name": "primary", "dsn": "host=127.0.0.1 port=1", **primary},
            "replicas": [
                {"name": "standby-1", "dsn": "host=127.0.0.2 port=1", "work_pool": "gravl-dr-node-sb"}
            ],
            "repository": {"url": "file:///nonexistent"},
        }
    )


def dead_primary(**kw: Any) -> NodeState:
    base: dict[str, Any] = {"name": "primary", "configured_role": "primary", "error": "connection refused"}
    return NodeState(**{**base, **kw})


def standby(**kw: Any) -> NodeState:
    base: dict[str, Any] = {
        "name": "standby-1",
        "configured_role": "replica",
        "reachable": True,
        "in_recovery": True,
        "receive_lsn": "0/3000000",
        "replay_lsn": "0/3000000",
        "wal_receiver": "streaming",
        "timeline": 1,
    }
    return NodeState(**{**base, **kw})


# ------------------------------------------------------------------------------- config


def test_a_node_names_its_work_pool_and_a_bad_pool_name_is_refused_naming_the_key() -> None:
    cfg = _cfg()
    assert cfg.replicas[0].work_pool == "gravl-dr-node-sb" and cfg.primary.pgdata is None
    with pytest.raises(ConfigError, match=r"invalid value for 'primary.work_pool'"):
        _cfg(work_pool="no spaces allowed")
    with pytest.raises(ConfigError, match=r"invalid value for 'primary.work_pool'"):
        _cfg(work_pool=3)
    with pytest.raises(ConfigError, match=r"unknown key 'primary.workpool'"):
        _cfg(workpool="x")


def test_where_a_nodes_steps_run() -> None:
    cfg = _cfg()
    assert step_location(cfg.replicas[0]) == "pool:gravl-dr-node-sb"
    assert step_location(cfg.primary) is None  # no pgdata here, no pool: nowhere
    assert step_location(_cfg(pgdata="/nonexistent/data").primary) == "here"


# ------------------------------------------------------------------------------- the plan says where


@pytest.mark.parametrize(
    ("primary", "method", "where"),
    [
        (dead_primary(runs_on="pool:gravl-dr-node-primary"), "stop", "pool:gravl-dr-node-primary"),
        (dead_primary(local_pgdata=True, postmaster_running=False), "stop", "here"),
        (dead_primary(), "none", "libpq"),
    ],
)
def test_the_fence_is_a_plan_decision_with_where_it_runs(primary: NodeState, method: str, where: str) -> None:
    plan = plan_failover(primary, [standby()], max_lag_bytes=1 << 24)
    fence = next(s for s in plan.steps if s.kind == "fence-old-primary")
    assert (fence.method, fence.where) == (method, where)
    line = next(ln for ln in plan.step_lines() if ln.startswith("fence-old-primary"))
    assert line.startswith(f"fence-old-primary ({method}) primary")
    if where.startswith("pool:"):
        assert "[on work pool gravl-dr-node-primary]" in line


def test_a_reachable_primary_without_files_or_worker_is_made_read_only() -> None:
    alive = dead_primary(reachable=True, in_recovery=False, current_lsn="0/3000000", error=None, timeline=1)
    plan = plan_failover(alive, [standby()], max_lag_bytes=1 << 24, force=True)
    fence = next(s for s in plan.steps if s.kind == "fence-old-primary")
    assert (fence.method, fence.where) == ("read-only", "libpq")


def test_failback_runs_the_rebuild_on_homes_worker_and_the_clean_stop_on_the_current_primarys() -> None:
    # GIVEN home observed by its own worker (a stuck standby on the old timeline) and standby-1 the primary
    home = NodeState(
        name="primary",
        configured_role="primary",
        reachable=True,
        in_recovery=True,
        timeline=1,
        local_pgdata=True,
        control_state="in archive recovery",
        rewind_capable=True,
        runs_on="pool:gravl-dr-node-primary",
    )
    current = standby(in_recovery=False, current_lsn="0/4000000", timeline=2, runs_on="pool:gravl-dr-node-sb")
    plan = plan_failback(home, [current], backup=False)
    where = {s.kind: s.where for s in plan.steps}
    # THEN every step on home's files runs on its pool, the switchover's stop on standby-1's
    for kind in ("stop-old-primary", "save-local-settings", "rewind-old-primary", "start-as-standby"):
        assert where[kind] == "pool:gravl-dr-node-primary", kind
    assert where["switchover"] == "pool:gravl-dr-node-sb"
    assert where["rejoin-former-primary"] == "pool:gravl-dr-node-sb"
    assert where["wait-for-zero-lag"] == "libpq" and where["validate"] == "libpq"


def test_failback_refuses_when_nobody_can_stop_the_current_primary() -> None:
    home = NodeState(
        name="primary",
        configured_role="primary",
        reachable=True,
        in_recovery=True,
        runs_on="here",
        local_pgdata=True,
    )
    current = standby(in_recovery=False, current_lsn="0/4000000", timeline=2)  # no pgdata here, no pool
    with pytest.raises(PreconditionFailed, match="no work pool"):
        plan_failback(home, [current], backup=False)


# ------------------------------------------------------------------------------- outcomes


def test_an_outcome_is_written_once_and_read_back(tmp_path: Path) -> None:
    repo = FileRepository(tmp_path, f"file://{tmp_path}")
    ok = NodeStepResult(step="fence", node="primary", ok=True, detail="stopped", at=datetime.now(UTC))
    key = write_step_result(repo, "run-1", ok)
    assert key == "node-steps/run-1.json"
    write_step_result(repo, "run-1", ok)  # a retried write of the same outcome is a success
    assert read_step_result(repo, "run-1") == ok
    # a run that crashed or was killed recorded nothing: None, never a success
    assert read_step_result(repo, "run-killed") is None


@pytest.mark.parametrize(
    ("exc", "raised"),
    [
        (RewindFailed("pg_rewind of primary failed"), RewindFailed),
        (PreconditionFailed("primary is running"), PreconditionFailed),
        (TransientError("connection refused"), TransientError),
        (PermanentError("disk full"), PermanentError),
    ],
)
def test_a_failed_step_is_raised_again_in_its_class_on_the_orchestrator(
    exc: Exception, raised: type[Exception]
) -> None:
    result = failed_result("rewind", "primary", exc)
    assert not result.ok
    with pytest.raises(raised, match=r"primary \(work pool p1, host .*\): "):
        raise_for_result(result, "pool:p1")


def test_a_step_needs_the_nodes_pgdata_in_this_hosts_config() -> None:
    cfg = _cfg()
    with pytest.raises(PreconditionFailed, match="standby-1 has no pgdata in this host's config"):
        run_node_step(cfg, "standby-1", "fence", NodeStepArgs())
    with pytest.raises(ConfigError, match="unknown node step"):
        run_node_step(cfg, "standby-1", "format-disk", NodeStepArgs())
    with pytest.raises(ConfigError, match="'nobody' is not a node"):
        run_node_step(cfg, "nobody", "fence", NodeStepArgs())
