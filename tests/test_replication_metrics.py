"""The minutely WAL flow also watches the primary and its replicas for the alert rules."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from conftest import pushgateway_metrics
from conftest_failover import Pair, sql

from flows.wal import _push_replication
from tasks.config import load_config
from tasks.pgcluster import free_port
from tasks.postgres import observe_primary


def test_replica_lag_and_primary_up_reach_the_pushgateway(
    pg_pair: Callable[..., Pair], pushgateway: str, make_config: Callable[..., Path], file_repo_url: str
) -> None:
    # GIVEN a primary streaming to one standby, the standby's replay paused
    pair = pg_pair()
    sql(pair.standby.dsn(), "SELECT pg_wal_replay_pause()")
    pair.insert(pair.home.dsn(), 20000, "unreplayed")
    # WHEN the primary is observed and the result pushed
    status = observe_primary(pair.home.dsn())
    cfg = load_config(str(make_config(file_repo_url, metrics={"pushgateway": pushgateway})))
    _push_replication(cfg, status)
    # THEN the primary is up and the standby's replay lag is the WAL it has not replayed
    assert status.up and not status.in_recovery
    [replica] = status.replicas
    assert replica.name == "standby-1" and replica.replay_lag_bytes > 100_000
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
