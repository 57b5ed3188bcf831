"""The failover's fence in the run that observes the old primary: the planner's decision, replayed on what the node's own worker saw."""

from __future__ import annotations

import pytest
from test_failover_plan import MB, dead_primary, live_primary, standby

from tasks.failover import FenceAhead, NodeState, Refused, fence_ahead, plan_failover


def ahead(*replicas: NodeState, force: bool = False, planned: bool = False) -> FenceAhead:
    return FenceAhead(
        replicas=list(replicas) or [standby()], max_lag_bytes=16 * MB, force=force, planned=planned
    )


@pytest.mark.parametrize(
    ("seen", "a", "fence"),
    [
        # down, not yet fenced, replica caught up: the plan's first step is the fence (before approval)
        (dead_primary(), ahead(), True),
        # its postmaster still runs although nobody could connect (hung, or cut from the orchestrator)
        (dead_primary(postmaster_running=True), ahead(), True),
        # already fenced and down: the plan needs no fence
        (dead_primary(fenced=True), ahead(), False),
        # its own WAL goes 64 MB beyond the replica: the planner refuses, so nothing is stopped
        (dead_primary(last_local_lsn="0/9000000"), ahead(), False),
        # ... unless forced: then the fence is again the plan's first step
        (dead_primary(last_local_lsn="0/9000000"), ahead(force=True), True),
        # no healthy replica: refused, nothing stopped
        (dead_primary(), ahead(standby(in_recovery=None, reachable=False)), False),
        # its worker reaches it and it takes writes: refused without --force ...
        (live_primary(), ahead(), False),
        # ... and with --force its fence comes after the approval: left to the flow
        (live_primary(), ahead(force=True), False),
        # a planned failover stops it cleanly after the approval, in the flow
        (live_primary(), ahead(standby(wal_receiver="streaming"), planned=True), False),
    ],
)
def test_the_worker_fences_exactly_when_the_plan_fences_first(
    seen: NodeState, a: FenceAhead, fence: bool
) -> None:
    go, why = fence_ahead(seen, a)
    assert go is fence, why
    try:
        plan = plan_failover(
            seen, a.replicas, max_lag_bytes=a.max_lag_bytes, force=a.force, planned=a.planned
        )
    except Refused:
        assert not go and "refuses" in why
        return
    # the same decision the orchestrator's planner makes with the observation it gets back
    assert go == (plan.steps[0].kind == "fence-old-primary" and plan.steps[0].method == "stop"), plan.kinds()


def test_the_planners_inputs_travel_as_json_and_decide_the_same() -> None:
    a = ahead(standby(replay="0/4000000"), force=False)
    back = FenceAhead.model_validate_json(a.model_dump_json())
    assert back == a
    assert fence_ahead(dead_primary(), back) == fence_ahead(dead_primary(), a)
