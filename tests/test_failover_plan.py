"""Pure planner tests: observed states in, plans or refusals out; interrupted plans replayed to convergence."""

from __future__ import annotations

from typing import Any

import pytest

from tasks.failover import (
    NodeState,
    Refused,
    lsn_to_int,
    plan_failback,
    plan_failover,
    rpo_bytes,
)
from tasks.walnames import format_lsn as int_to_lsn

MB = 1024 * 1024


def dead_primary(**kw: Any) -> NodeState:
    base: dict[str, Any] = {
        "name": "home",
        "configured_role": "primary",
        "address": "127.0.0.1:5432",
        "reachable": False,
        "error": "connection refused",
        "local_pgdata": True,
        "postmaster_running": False,
        "control_state": "in production",
        "last_local_lsn": "0/5000000",
        "system_identifier": "42",
    }
    base.update(kw)
    return NodeState(**base)


def live_primary(**kw: Any) -> NodeState:
    base: dict[str, Any] = {
        "name": "home",
        "configured_role": "primary",
        "address": "127.0.0.1:5432",
        "reachable": True,
        "in_recovery": False,
        "read_only": False,
        "current_lsn": "0/5000000",
        "timeline": 1,
        "local_pgdata": True,
        "postmaster_running": True,
        "system_identifier": "42",
    }
    base.update(kw)
    return NodeState(**base)


def standby(
    name: str = "standby-1", replay: str = "0/5000000", receive: str | None = None, **kw: Any
) -> NodeState:
    base: dict[str, Any] = {
        "name": name,
        "configured_role": "replica",
        "address": f"{name}:5432",
        "reachable": True,
        "in_recovery": True,
        "read_only": False,
        "replay_lsn": replay,
        "receive_lsn": receive or replay,
        "wal_receiver": None,
        "timeline": 1,
        "system_identifier": "42",
        "local_pgdata": True,
        "postmaster_running": True,
    }
    base.update(kw)
    return NodeState(**base)


def promoted(name: str = "standby-1", lsn: str = "0/6000000", **kw: Any) -> NodeState:
    fields: dict[str, Any] = {
        "in_recovery": False,
        "current_lsn": lsn,
        "replay_lsn": None,
        "receive_lsn": None,
        "timeline": 2,
    }
    fields.update(kw)
    return standby(name, **fields)


@pytest.mark.parametrize("text", ["0/0", "0/5000000", "16/B374D848", "FFFFFFFF/FFFFFFFF"])
def test_lsn_round_trip(text: str) -> None:
    assert int_to_lsn(lsn_to_int(text)) == text


@pytest.mark.parametrize("bad", ["", "5000000", "0/", "x/1", "1/2/3"])
def test_lsn_rejects_garbage(bad: str) -> None:
    with pytest.raises(ValueError):
        lsn_to_int(bad)


def test_dead_primary_plan_is_the_runbook_order() -> None:
    plan = plan_failover(dead_primary(), [standby()], max_lag_bytes=MB)
    assert plan.kinds() == [
        "fence-old-primary",
        "approve",
        "promote-replica",
        "switch-dns",
        "reconnect-apps",
        "validate",
    ]
    assert plan.target == "standby-1" and plan.lag_bytes == 0 and plan.reference_lsn == "0/5000000"


def test_most_advanced_healthy_replica_is_chosen() -> None:
    replicas = [
        standby("a", "0/4000000"),
        standby("b", "0/4800000", receive="0/4900000"),
        standby("c", "0/4900000", reachable=False, in_recovery=None),
        standby("d", "0/4F00000", system_identifier="other-cluster"),
    ]
    plan = plan_failover(dead_primary(last_local_lsn="0/4900000"), replicas, max_lag_bytes=MB)
    # d is further but belongs to another cluster; c is unreachable; b received the most
    assert plan.target == "b" and plan.lag_bytes == 0


def test_tie_goes_to_the_first_configured_replica() -> None:
    plan = plan_failover(dead_primary(), [standby("a"), standby("b")], max_lag_bytes=MB)
    assert plan.target == "a"


@pytest.mark.parametrize(
    ("primary", "kw", "message"),
    [
        (live_primary(), {}, "up and accepting writes"),
        (dead_primary(last_local_lsn="0/9000000"), {}, "bytes behind"),
        (live_primary(local_pgdata=False), {"planned": True}, "planned failover needs"),
    ],
)
def test_refusals(primary: NodeState, kw: dict[str, Any], message: str) -> None:
    with pytest.raises(Refused, match=message):
        plan_failover(primary, [standby()], max_lag_bytes=MB, **kw)


def test_no_healthy_replica_is_refused_with_evidence() -> None:
    with pytest.raises(Refused, match="no healthy replica.*standby-1: unreachable"):
        plan_failover(dead_primary(), [standby(reachable=False, in_recovery=None)], max_lag_bytes=MB)


def test_split_brain_is_refused() -> None:
    with pytest.raises(Refused, match="split brain"):
        plan_failover(dead_primary(), [promoted("a"), promoted("b")], max_lag_bytes=MB)
    with pytest.raises(Refused, match="both accept writes"):
        plan_failover(live_primary(), [promoted()], max_lag_bytes=MB)


def test_force_fences_a_live_primary_after_asking() -> None:
    plan = plan_failover(live_primary(), [standby()], max_lag_bytes=MB, force=True)
    assert plan.kinds()[:3] == ["approve", "fence-old-primary", "promote-replica"]


def test_force_accepts_lag_with_a_note() -> None:
    plan = plan_failover(dead_primary(last_local_lsn="0/9000000"), [standby()], max_lag_bytes=MB, force=True)
    assert plan.lag_bytes == 0x4000000 and any("FORCED" in n for n in plan.notes)


def test_planned_failover_needs_a_streaming_replica() -> None:
    with pytest.raises(Refused, match="streaming now"):
        plan_failover(live_primary(), [standby()], max_lag_bytes=MB, planned=True)
    plan = plan_failover(live_primary(), [standby(wal_receiver="streaming")], max_lag_bytes=MB, planned=True)
    assert "fence-old-primary" in plan.kinds()


def test_unreachable_primary_without_local_data_gets_a_recorded_fence_step() -> None:
    primary = dead_primary(
        local_pgdata=False, postmaster_running=None, last_local_lsn=None, control_state=None
    )
    plan = plan_failover(primary, [standby()], max_lag_bytes=MB)
    fence = next(s for s in plan.steps if s.kind == "fence-old-primary")
    assert "could not be fenced" in fence.reason
    assert plan.reference_lsn is None  # RPO unknown: nothing known of the old primary's WAL


# Replaying an interrupted failover: after each applied step, observe the new state, plan again.
@pytest.mark.parametrize(
    ("after", "primary", "replica", "expected"),
    [
        (
            "nothing",
            dead_primary(),
            standby(),
            ["fence-old-primary", "approve", "promote-replica", "switch-dns", "reconnect-apps", "validate"],
        ),
        (
            "fence",
            dead_primary(fenced=True),
            standby(),
            ["approve", "promote-replica", "switch-dns", "reconnect-apps", "validate"],
        ),
        ("promote", dead_primary(fenced=True), promoted(), ["switch-dns", "reconnect-apps", "validate"]),
        (
            "promote, old primary restarted read-only by the fence",
            dead_primary(fenced=True, reachable=True, in_recovery=True, postmaster_running=True),
            promoted(),
            ["fence-old-primary", "switch-dns", "reconnect-apps", "validate"],
        ),
    ],
)
def test_interrupted_failover_replans_only_what_is_left(
    after: str,
    primary: NodeState,
    replica: NodeState,
    expected: list[str],
) -> None:
    plan = plan_failover(primary, [replica], max_lag_bytes=MB)
    assert plan.kinds() == expected, after
    assert plan.already_promoted == (replica.in_recovery is False)


def test_rpo_bytes() -> None:
    assert rpo_bytes("0/5000100", "0/5000000") == 256
    assert rpo_bytes("0/5000000", "0/5000100") == 0
    assert rpo_bytes(None, "0/5000000") is None


# ----------------------------------------------------------------------------- failback


def home_standby(upstream: str = "standby-1:5432", **kw: Any) -> NodeState:
    fields: dict[str, Any] = {
        "address": "127.0.0.1:5432",
        "wal_receiver": "streaming",
        "upstream": upstream,
        "configured_role": "primary",
    }
    fields.update(kw)
    return standby("home", **fields)


def test_failback_full_plan_after_a_failover() -> None:
    plan = plan_failback(
        dead_primary(fenced=True, rewind_capable=True, timeline=1), [promoted(history=[(1, "0/4000000")])]
    )
    assert plan.current == "standby-1"
    assert plan.kinds() == [
        "backup-current-primary",
        "save-local-settings",
        "keep-old-wal",
        "rewind-old-primary",
        "start-as-standby",
        "wait-for-zero-lag",
        "approve",
        "switchover",
        "rejoin-former-primary",
        "switch-dns",
        "reconnect-apps",
        "validate",
    ]
    assert (plan.diverged_timeline, plan.fork_lsn, plan.end_lsn) == (1, "0/4000000", "0/5000000")
    assert plan.rpo_bytes == 0x1000000


def _rebuild(**home: Any) -> list[str]:
    fields: dict[str, Any] = {"fenced": True, "rewind_capable": True, "timeline": 1}
    fields.update(home)
    plan = plan_failback(dead_primary(**fields), [promoted(history=[(1, "0/5000000")])], backup=False)
    return plan.kinds()[: plan.kinds().index("wait-for-zero-lag")]


@pytest.mark.parametrize(
    ("home", "steps"),
    [
        # nothing un-replicated: nothing to keep, rewind
        ({}, ["save-local-settings", "rewind-old-primary", "start-as-standby"]),
        # cleanly stopped standby (the guard kept it in standby mode, then it was stopped)
        (
            {"control_state": "shut down in recovery"},
            ["save-local-settings", "rewind-old-primary", "start-as-standby"],
        ),
        # pg_rewind impossible
        ({"rewind_capable": False}, ["save-local-settings", "reclone-old-primary", "start-as-standby"]),
        # a crashed standby may hold another timeline's data: never recovered on its own
        (
            {"control_state": "in archive recovery"},
            ["save-local-settings", "reclone-old-primary", "start-as-standby"],
        ),
        # killed during pg_rewind, or pg_rewind failed: re-clone, settings were saved already
        ({"rebuild_phase": "rewinding"}, ["reclone-old-primary", "start-as-standby"]),
        ({"rebuild_phase": "rewind-failed"}, ["reclone-old-primary", "start-as-standby"]),
        # killed after the rewind or the clone: only ever started as a standby
        ({"rebuild_phase": "rewound", "control_state": "in archive recovery"}, ["start-as-standby"]),
        ({"rebuild_phase": "cloned"}, ["start-as-standby"]),
        # killed between moving the old directory aside and the end of the clone
        (
            {"rebuild_phase": "moved-aside", "control_state": None},
            ["reclone-old-primary", "start-as-standby"],
        ),
        # still running (a stuck standby on the old timeline): stop it first
        (
            {"postmaster_running": True, "control_state": None},
            ["stop-old-primary", "save-local-settings", "rewind-old-primary", "start-as-standby"],
        ),
    ],
)
def test_failback_rebuild_is_read_off_the_disk_and_resumes_anywhere(
    home: dict[str, Any], steps: list[str]
) -> None:
    assert _rebuild(**home) == steps


def test_failback_keep_and_discard_are_plan_steps() -> None:
    keep = _rebuild(last_local_lsn="0/5100000")
    assert keep == ["save-local-settings", "keep-old-wal", "rewind-old-primary", "start-as-standby"]
    discard = plan_failback(
        dead_primary(fenced=True, rewind_capable=False, timeline=1),
        [promoted(history=[(1, "0/5000000")])],
        backup=False,
        discard_old_data=True,
    )
    assert discard.kinds()[:4] == [
        "save-local-settings",
        "reclone-old-primary",
        "start-as-standby",
        "discard-old-data",
    ]
    assert "discard" in discard.steps[1].reason


def test_failback_never_starts_a_directory_that_was_not_rebuilt() -> None:
    # GIVEN every phase and control state an interrupted failback can leave
    for phase in (None, "rewinding", "rewind-failed", "rewound", "cloned", "moved-aside"):
        for state in ("shut down", "in production", "in archive recovery", "in crash recovery", None):
            kinds = _rebuild(rebuild_phase=phase, control_state=state)
            # THEN start-as-standby always comes after a rewind or a re-clone, unless the disk says
            # one finished already
            assert kinds[-1] == "start-as-standby"
            if phase not in ("rewound", "cloned"):
                assert {"rewind-old-primary", "reclone-old-primary"} & set(kinds), (phase, state, kinds)


def test_failback_skips_rebuild_when_home_already_streams_from_the_current_primary() -> None:
    plan = plan_failback(home_standby(), [promoted()], backup=False)
    assert plan.kinds()[:3] == ["wait-for-zero-lag", "approve", "switchover"]


def test_failback_resumes_after_clean_shutdown_before_promotion() -> None:
    stopped = promoted(reachable=False, in_recovery=None, postmaster_running=False, control_state="shut down")
    plan = plan_failback(home_standby(wal_receiver="waiting"), [stopped])
    assert plan.current is None
    assert plan.kinds() == [
        "approve",
        "switchover",
        "rejoin-former-primary",
        "switch-dns",
        "reconnect-apps",
        "validate",
    ]


def test_failback_when_home_is_primary_only_converges() -> None:
    plan = plan_failback(live_primary(), [standby(wal_receiver="streaming", upstream="127.0.0.1:5432")])
    assert plan.kinds() == ["switch-dns", "reconnect-apps", "validate"]


@pytest.mark.parametrize(
    ("home", "others", "message"),
    [
        (live_primary(), [promoted()], "split brain"),
        (dead_primary(), [standby()], "nothing to fail back from"),
        (dead_primary(local_pgdata=False), [promoted()], "not on this host"),
        (
            dead_primary(reachable=False, answered=True, error="FATAL:  sorry, too many clients already"),
            [promoted()],
            "refuses gravl-dr's login",
        ),
    ],
)
def test_failback_refusals(home: NodeState, others: list[NodeState], message: str) -> None:
    with pytest.raises(Refused, match=message):
        plan_failback(home, others)
