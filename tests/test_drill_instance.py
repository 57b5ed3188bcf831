"""The drill instance's settings a hot standby may not lower come from the restored pg_control."""

from __future__ import annotations

from collections.abc import Callable

from tasks.drill import DrillInstance, configure_instance, hot_standby_minimums, start_instance
from tasks.pgcluster import LocalCluster, free_port
from tasks.postgres import connection

PG_USER = "postgres"


def test_hot_standby_minimums_are_the_source_settings_recorded_in_pg_control(
    cluster_factory: Callable[..., LocalCluster],
) -> None:
    # GIVEN a cluster run with settings other than the defaults (as a source configured outside
    # its data directory would be: a drill could not read them from postgresql.conf)
    cluster = cluster_factory(
        "gravl-test-drill-instance-",
        extra_conf={
            "max_connections": "57",
            "max_prepared_transactions": "3",
            "max_locks_per_transaction": "96",
            "max_worker_processes": "9",
            "max_wal_senders": "7",
        },
    )
    with connection(cluster.dsn("postgres")) as conn:
        shown = {
            name: str(conn.execute(f"SHOW {name}").fetchone()[0])  # type: ignore[index]
            for name in (
                "max_connections",
                "max_prepared_transactions",
                "max_locks_per_transaction",
                "max_worker_processes",
                "max_wal_senders",
            )
        }
    cluster.stop()
    instance = DrillInstance(
        drill_id="t",
        workdir=str(cluster.pgdata.parent),
        port=cluster.port,
        os_user=PG_USER,
        bindir="auto",
        superuser="postgres",
    )
    assert instance.pgdata == cluster.pgdata
    # WHEN the drill reads them from pg_control
    # THEN they are the cluster's own
    assert (
        hot_standby_minimums(instance)
        == shown
        == {
            "max_connections": "57",
            "max_prepared_transactions": "3",
            "max_locks_per_transaction": "96",
            "max_worker_processes": "9",
            "max_wal_senders": "7",
        }
    )


def test_a_restored_data_directory_starts_here_whatever_the_source_required(
    cluster_factory: Callable[..., LocalCluster],
) -> None:
    # GIVEN a stopped cluster whose postgresql.auto.conf (part of any base backup) asks for
    # huge pages and another port, as a production source's ALTER SYSTEM settings may
    cluster = cluster_factory("gravl-test-drill-instance-")
    cluster.stop()
    with open(cluster.pgdata / "postgresql.auto.conf", "a") as fh:
        fh.write("huge_pages = on\nport = 1\nlisten_addresses = '*'\n")
    instance = DrillInstance(
        drill_id="t2",
        workdir=str(cluster.pgdata.parent),
        port=free_port(),
        os_user=PG_USER,
        bindir="auto",
        superuser="postgres",
    )
    # WHEN the drill configures it as its throwaway instance and starts it
    configure_instance(instance)
    start_instance(instance, timeout=60)
    try:
        # THEN it runs on the drill's own loopback port, with huge pages only if available
        with connection(instance.dsn()) as conn:
            settings = {
                name: conn.execute(f"SHOW {name}").fetchone()[0]  # type: ignore[index]
                for name in ("huge_pages", "port", "listen_addresses", "hot_standby")
            }
        assert settings == {
            "huge_pages": "try",
            "port": str(instance.port),
            "listen_addresses": "127.0.0.1",
            "hot_standby": "on",
        }
    finally:
        instance.cluster().stop()
