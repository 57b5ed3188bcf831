"""Long waits on real servers: they poll on one connection per node and say how far they are."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
from conftest_failover import sql

from tasks.errors import PreconditionFailed, TransientError
from tasks.pgcluster import LocalCluster, chown_tree
from tasks.recovery import RecoveryTarget, wait_for_pause, wait_for_recovery
from tasks.topology import wait_for_zero_lag


def sessions(dsn: str) -> int:
    # pg_stat_database.sessions (PostgreSQL 14+): sessions established to the database so far
    return int(sql(dsn, "SELECT sessions FROM pg_stat_database WHERE datname = current_database()")[0][0])


def test_wait_for_zero_lag_holds_one_connection_per_node_and_logs_progress(
    pg_pair: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # GIVEN a standby whose replay is paused while the primary writes: it cannot catch up
    pair = pg_pair()
    sql(pair.standby.dsn(), "SELECT pg_wal_replay_pause()")
    pair.insert(pair.home.dsn(), 1000, "ahead")
    before = (sessions(pair.home.dsn()), sessions(pair.standby.dsn()))
    caplog.set_level(logging.INFO, logger="tasks.topology")
    # WHEN failback waits for zero lag for 8 s
    with pytest.raises(TransientError) as exc:
        wait_for_zero_lag(pair.standby_node, pair.home_node, timeout=8)
    after = (sessions(pair.home.dsn()), sessions(pair.standby.dsn()))
    # THEN it gave up naming both positions and the gap, having opened one session per node
    # (plus the one each sessions() call opens), not two new ones every 0.1 s
    assert "did not catch up" in str(exc.value) and "bytes behind" in str(exc.value)
    assert after[0] - before[0] <= 2 and after[1] - before[1] <= 2, (before, after)
    # AND it said what it waited for, how far it was and its deadline while waiting
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting for standby-1")]
    assert lines, [r.getMessage() for r in caplog.records]
    assert "bytes behind" in lines[0] and "gives up at" in lines[0]
    assert len(lines) <= 2  # after 5 s, then every 15 s: no flood
    sql(pair.standby.dsn(), "SELECT pg_wal_replay_resume()")


def test_recovery_waits_give_up_at_their_timeout_with_the_servers_word(
    cluster_factory: Callable[..., LocalCluster],
) -> None:
    # GIVEN a server that stays in recovery for ever (a standby with no primary and no archive)
    cluster = cluster_factory("gravl-test-waits-")
    cluster.stop()
    (cluster.pgdata / "standby.signal").touch()
    chown_tree(cluster.pgdata, cluster.os_user)
    cluster.start()
    # WHEN the restore waits for it to promote, or the drill for it to pause at a restore point
    # THEN each gives up at its deadline, saying what it waited for and quoting the server's log
    with pytest.raises(PreconditionFailed, match=r"recovery did not finish within 1s; server log: "):
        wait_for_recovery(cluster, RecoveryTarget(), timeout=1)
    with pytest.raises(
        PreconditionFailed, match=r"recovery did not reach name never within 1s; server log: "
    ):
        wait_for_pause(cluster, RecoveryTarget(kind="name", value="never"), timeout=1)
    assert cluster.is_running()
