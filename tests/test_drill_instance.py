"""The drill instance's settings a hot standby may not lower come from the restored pg_control."""

from __future__ import annotations

from collections.abc import Callable

from tasks.drill import DrillInstance, hot_standby_minimums
from tasks.pgcluster import LocalCluster
from tasks.postgres import connection

PG_USER = "postgres"


def test_hot_standby_minimums_are_the_source_settings_recorded_in_pg_control(
        cluster_factory: Callable[..., LocalCluster]) -> None:
    # GIVEN a cluster run with settings other than the defaults (as a source configured outside
    # its data directory would be: a drill could not read them from postgresql.conf)
    cluster = cluster_factory("gravl-test-drill-instance-", extra_conf={
        "max_connections": "57", "max_prepared_transactions": "3", "max_locks_per_transaction": "96",
        "max_worker_processes": "9", "max_wal_senders": "7"})
    with connection(cluster.dsn("postgres")) as conn:
        shown = {name: str(conn.execute(f"SHOW {name}").fetchone()[0])  # type: ignore[index]
                 for name in ("max_connections", "max_prepared_transactions", "max_locks_per_transaction",
                              "max_worker_processes", "max_wal_senders")}
    cluster.stop()
    instance = DrillInstance(drill_id="t", workdir=str(cluster.pgdata.parent), port=cluster.port,
                             os_user=PG_USER, bindir="auto", superuser="postgres")
    assert instance.pgdata == cluster.pgdata
    # WHEN the drill reads them from pg_control
    # THEN they are the cluster's own
    assert hot_standby_minimums(instance) == shown == {
        "max_connections": "57", "max_prepared_transactions": "3", "max_locks_per_transaction": "96",
        "max_worker_processes": "9", "max_wal_senders": "7"}
