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


def test_the_restore_polls_for_the_promotion_on_one_session_and_sees_a_killed_server(
    cluster_factory: Callable[..., LocalCluster],
) -> None:
    """wait_for_recovery polls every 50 ms: on one kept session (a new backend per poll, and a
    `pg_ctl status` process per poll, took CPU from the replay it waits for), and a server
    killed with -9 under it is still reported as stopped, with the server's word, at once."""
    import os
    import signal
    import threading
    import time

    # GIVEN a server that stays in recovery (a standby with no primary and no archive)
    cluster = cluster_factory("gravl-test-waits-poll-")
    cluster.stop()
    (cluster.pgdata / "standby.signal").touch()
    chown_tree(cluster.pgdata, cluster.os_user)
    cluster.start()
    before = sessions(cluster.dsn("postgres"))
    # WHEN the restore waits 2 s for it to promote
    with pytest.raises(PreconditionFailed, match=r"recovery did not finish within 2s"):
        wait_for_recovery(cluster, RecoveryTarget(), timeout=2)
    # THEN it opened one session (and sessions() one), not one per poll (about 40)
    assert sessions(cluster.dsn("postgres")) - before <= 2
    # WHEN its postmaster is killed with -9 while the restore waits
    pid = cluster.postmaster_pid()
    assert pid is not None
    threading.Timer(1.0, os.kill, (pid, signal.SIGKILL)).start()
    t0 = time.monotonic()
    with pytest.raises(PreconditionFailed, match=r"restored server stopped during recovery"):
        wait_for_recovery(cluster, RecoveryTarget(), timeout=600)
    # THEN the wait ends within seconds of the kill, not at its deadline
    assert time.monotonic() - t0 < 300
