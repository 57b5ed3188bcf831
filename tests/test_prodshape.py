"""The production-shaped fixture holds what its docstring promises (other tests rely on it)."""

from __future__ import annotations

import time

import pytest
from prodshape import (
    EXPECTED_ROWS,
    HISTORY_DB,
    LATIN1_DB,
    NO_CONNECT_DB,
    READ_ONLY_DB,
    ProdCluster,
    build_prod_cluster,
)

from tasks.postgres import count_rows

WRITTEN = {"public.ticks", "Sales.Order", "Sales.Order Items"}  # what writes() inserts into


def test_prod_cluster_has_the_promised_shape(prod_cluster: ProdCluster) -> None:
    p = prod_cluster
    # databases: encodings, read-only default, no connections
    rows = dict(p.sql("SELECT datname, pg_encoding_to_char(encoding) FROM pg_database", dbname="postgres"))
    assert rows[LATIN1_DB] == "LATIN1" and rows["shop"] == "UTF8"
    assert (
        p.sql("SELECT datallowconn FROM pg_database WHERE datname = %s", (NO_CONNECT_DB,), dbname="postgres")[
            0
        ][0]
        is False
    )
    settings = p.sql(
        "SELECT array_to_string(setconfig, ',') FROM pg_db_role_setting s "
        "JOIN pg_database d ON d.oid = s.setdatabase WHERE d.datname = %s AND s.setrole = 0",
        (READ_ONLY_DB,),
        dbname="postgres",
    )
    assert settings == [("default_transaction_read_only=on",)]
    # SCRAM verifiers for the login roles, the backup role from roles.sql
    verifiers = dict(
        p.sql("SELECT rolname, rolpassword FROM pg_authid WHERE rolpassword IS NOT NULL", dbname="postgres")
    )
    assert {"app_owner", "app_user", "analyst", "gravl_dr"} <= set(verifiers)
    assert all(v.startswith("SCRAM-SHA-256$") for v in verifiers.values())
    assert p.sql("SELECT rolreplication FROM pg_roles WHERE rolname = 'gravl_dr'", dbname="postgres")[0][0]
    # exact counts as a superuser; partitioned indexes and unlogged tables exist
    with p.connect("shop") as conn:
        counts = count_rows(conn)
        kinds = dict(
            conn.execute(
                "SELECT relname, relkind::text FROM pg_class WHERE relname IN "
                "('events_kind', 'events_pkey', 'order_totals')"
            ).fetchall()
        )
        unlogged = conn.execute(
            "SELECT relname FROM pg_class WHERE relpersistence = 'u' AND relkind = 'r'"
        ).fetchall()
        ddl = conn.execute("SELECT count(*) FROM audit.ddl_log").fetchone()
        lobs = conn.execute("SELECT count(*) FROM pg_largeobject_metadata").fetchone()
    for table, n in EXPECTED_ROWS["shop"].items():
        if table in WRITTEN:
            assert counts[table] >= n, table  # other tests of the session ran writes()
        else:
            assert counts[table] == n, table
    assert kinds == {"events_kind": "I", "events_pkey": "I", "order_totals": "m"}
    assert unlogged == [("session_cache",)]
    assert ddl is not None and ddl[0] > 10 and lobs == (5,)
    for db in (LATIN1_DB, READ_ONLY_DB, HISTORY_DB):
        with p.connect(db) as conn:
            assert count_rows(conn) == EXPECTED_ROWS[db]
    assert p.sql("SELECT max(placed) < '2020-01-01' FROM orders_2019", dbname=HISTORY_DB) == [(True,)]


def test_rls_hides_rows_from_a_role_without_bypassrls(prod_cluster: ProdCluster) -> None:
    # app_user is an application role: RLS applies to it, and it sees none of the 500 secrets
    assert prod_cluster.sql("SELECT count(*) FROM public.secrets", user="app_user") == [(0,)]


def test_writes_commit_while_running(prod_cluster: ProdCluster) -> None:
    before = prod_cluster.sql("SELECT count(*) FROM public.ticks")[0][0]
    with prod_cluster.writes(rate=100) as load:
        time.sleep(1)
    after = prod_cluster.sql("SELECT count(*) FROM public.ticks")[0][0]
    assert after - before >= 20 and load.transactions == after - before


@pytest.mark.integration  # starts a cluster
@pytest.mark.parametrize("tablespace", [True])
def test_builder_options_tablespace_and_password_auth(tablespace: bool) -> None:
    prod = build_prod_cluster(tablespace=tablespace, password_auth=True, archive=False)
    try:
        assert prod.sql("SELECT count(*) FROM public.attachments") == [(50,)]
        assert prod.sql(
            "SELECT spcname FROM pg_tablespace WHERE spcname = 'app_space'", dbname="postgres"
        ) == [("app_space",)]
        import psycopg

        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(prod.dsn("shop", "app_user"), connect_timeout=5).close()
        assert prod.sql("SELECT current_user", user="app_user") == [("app_user",)]
    finally:
        prod.destroy()
