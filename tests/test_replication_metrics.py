"""The minutely WAL flow also watches the primary and its replicas for the alert rules."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from conftest import pushgateway_metrics
from conftest_failover import Pair, sql

from flows.wal import _push_replication
from tasks.config import load_config
from tasks.pgcluster import free_port
from tasks.postgres import PrimaryStatus, ReplicaLag, observe_primary


def test_replica_lag_and_primary_up_reach_the_pushgateway(
    pg_pair: Callable[..., Pair], pushgateway: str, make_config: Callable[..., Path], file_repo_url: str
) -> None:
    # GIVEN a primary streaming to one standby, the standby's replay paused
    pair = pg_pair()
    sql(pair.standby.dsn(), "SELECT pg_wal_replay_pause()")
    pair.insert(pair.home.dsn(), 20000, "unreplayed")
    # WHEN the primary is observed (once the standby has reported how far it replayed: until then
    # the lag is unknown, see the next test) and the result pushed
    deadline = time.monotonic() + 60
    status = observe_primary(pair.home.dsn())
    while any(r.replay_lag_bytes is None for r in status.replicas) and time.monotonic() < deadline:
        time.sleep(0.2)
        status = observe_primary(pair.home.dsn())
    cfg = load_config(str(make_config(file_repo_url, metrics={"pushgateway": pushgateway})))
    _push_replication(cfg, status)
    # THEN the primary is up and the standby's replay lag is the WAL it has not replayed
    assert status.up and not status.in_recovery
    [replica] = status.replicas
    assert replica.name == "standby-1"
    assert replica.replay_lag_bytes is not None and replica.replay_lag_bytes > 100_000
    metrics = pushgateway_metrics(pushgateway)
    assert 'gravl_primary_up{cluster="gravl",instance="",job="wal-check"} 1' in metrics
    lag_lines = [ln for ln in metrics.splitlines() if ln.startswith("gravl_replication_lag_bytes{")]
    assert lag_lines and 'replica="standby-1"' in lag_lines[0]
    assert float(lag_lines[0].rsplit(" ", 1)[1]) == replica.replay_lag_bytes


def test_unreachable_primary_is_observed_as_down(
    pushgateway: str, make_config: Callable[..., Path], file_repo_url: str
) -> None:
    dsn = f"host=127.0.0.1 port={free_port()} user=postgres dbname=gravl"
    status = observe_primary(dsn, timeout=2)
    assert not status.up and status.error
    cfg = load_config(str(make_config(file_repo_url, cluster="down", metrics={"pushgateway": pushgateway})))
    _push_replication(cfg, status)
    assert 'gravl_primary_up{cluster="down",instance="",job="wal-check"} 0' in pushgateway_metrics(
        pushgateway
    )


def test_a_replica_that_has_not_reported_its_replay_position_is_pushed_as_unknown_not_as_0(
    pushgateway: str, make_config: Callable[..., Path], file_repo_url: str
) -> None:
    # GIVEN a replica that has just connected (pg_stat_replication.replay_lsn still NULL), after an
    # earlier push of a real lag for it
    cfg = load_config(
        str(make_config(file_repo_url, cluster="unreported", metrics={"pushgateway": pushgateway}))
    )
    _push_replication(
        cfg, PrimaryStatus(up=True, replicas=(ReplicaLag("standby-9", "streaming", 5_000_000),))
    )
    # WHEN the next observation cannot say how far it replayed
    _push_replication(cfg, PrimaryStatus(up=True, replicas=(ReplicaLag("standby-9", "startup", None),)))
    # THEN the lag is NaN: neither "caught up" (0) nor the stale 5 MB
    [line] = [
        ln
        for ln in pushgateway_metrics(pushgateway).splitlines()
        if ln.startswith("gravl_replication_lag_bytes{") and 'cluster="unreported"' in ln
    ]
    assert line.rsplit(" ", 1)[1] == "NaN"
