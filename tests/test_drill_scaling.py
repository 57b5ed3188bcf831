"""Drill checks that scale, on a real PostgreSQL 15: amcheck's heapallindexed pass limited by
drill.heapallindexed_max_mb, and default-suite expectations that read their query once.

The index made inconsistent here has a correct structure but misses its heap's keys: an
expression index whose IMMUTABLE function is redefined after the index was built. Only the
heapallindexed pass can see that, so these tests tell which indexes got it.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from conftest import _new_cluster
from drill_helpers import corrupt_index
from pydantic import ValidationError

from tasks.config import DrillConfig
from tasks.expectations import MAX_SAMPLES, plan_default, read_catalog, run_expectations
from tasks.integrity import amcheck_database
from tasks.pgcluster import LocalCluster
from tasks.postgres import connection
from tasks.sample import create_database


@pytest.fixture(scope="module")
def amcheck_cluster() -> Iterator[LocalCluster]:
    """One cluster for this module. Database `stale`: table `big` (about 2 MiB) has an index that
    lacks its heap's keys, table `small` (one page) a consistent one. Database `garbage`: table
    `big`'s primary key has a page of garbage."""
    cluster = _new_cluster(
        "gravl-test-amcheck-", extra_conf={"shared_preload_libraries": "'pg_stat_statements'"}
    )
    try:
        for db in ("stale", "garbage", "orphans"):
            create_database(cluster.dsn("postgres"), db)
        with connection(cluster.dsn("stale")) as conn:
            conn.execute("CREATE TABLE small (id int PRIMARY KEY)")
            conn.execute("INSERT INTO small SELECT generate_series(1, 10)")
            conn.execute("CREATE FUNCTION shifted(int) RETURNS int IMMUTABLE LANGUAGE sql AS 'SELECT $1'")
            conn.execute("CREATE TABLE big (id int, pad text)")
            conn.execute("INSERT INTO big SELECT g, repeat('x', 100) FROM generate_series(1, 15000) g")
            conn.execute("CREATE INDEX big_shifted ON big (shifted(id))")
            conn.execute(
                "CREATE OR REPLACE FUNCTION shifted(int) RETURNS int IMMUTABLE LANGUAGE sql "
                "AS 'SELECT $1 + 1000000'"
            )
            size = conn.execute("SELECT pg_relation_size('big')").fetchone()
        assert size is not None and 2**20 < size[0] < 3 * 2**20
        with connection(cluster.dsn("garbage")) as conn:
            conn.execute("CREATE TABLE big (id int PRIMARY KEY, pad text)")
            conn.execute("INSERT INTO big SELECT g, repeat('x', 100) FROM generate_series(1, 15000) g")
        with connection(cluster.dsn("orphans")) as conn:
            conn.execute("CREATE EXTENSION pg_stat_statements")
            conn.execute("CREATE TABLE parent (id int PRIMARY KEY)")
            conn.execute("CREATE TABLE child (id int PRIMARY KEY, parent_id int REFERENCES parent)")
            conn.execute("INSERT INTO parent SELECT generate_series(1, 100)")
            conn.execute("SET session_replication_role = replica")  # FK triggers off: orphans
            conn.execute(
                "INSERT INTO child SELECT g, CASE WHEN g <= 25 THEN 1000 + g ELSE 1 END "
                "FROM generate_series(1, 200) g"
            )
        corrupt_index(cluster, "garbage", "big_pkey")
        yield cluster
    finally:
        cluster.destroy()
        shutil.rmtree(cluster.pgdata.parent, ignore_errors=True)


@pytest.fixture
def stale_index_dsn(amcheck_cluster: LocalCluster) -> str:
    return amcheck_cluster.dsn("stale")


def test_heapallindexed_on_every_index_finds_the_index_that_lacks_heap_keys(stale_index_dsn: str) -> None:
    # WHEN every index gets the heapallindexed pass (no size limit)
    result = amcheck_database(stale_index_dsn, "postgres", heapallindexed_max_mb=None)
    # THEN the check fails naming the inconsistent index, and only that one
    assert result.status == "failed"
    assert [s["index"] for s in result.samples] == ["public.big_shifted"]
    assert "lacks matching index tuple" in result.samples[0]["error"]
    assert "with heapallindexed" in result.summary and "structure only" not in result.summary


def test_tables_under_the_limit_still_get_heapallindexed(stale_index_dsn: str) -> None:
    # WHEN the limit (3 MiB) is above the 2 MiB table
    result = amcheck_database(stale_index_dsn, "postgres", heapallindexed_max_mb=3)
    # THEN its index gets the heapallindexed pass and the check fails
    assert result.status == "failed"
    assert result.samples[0]["index"] == "public.big_shifted"


def test_tables_over_the_limit_get_the_structure_check_and_the_report_names_them(
    stale_index_dsn: str,
) -> None:
    # WHEN the limit (1 MiB) is below the 2 MiB table
    result = amcheck_database(stale_index_dsn, "postgres", heapallindexed_max_mb=1)
    # THEN its index only gets the structure check (which this inconsistency passes), the small
    # table's index still gets heapallindexed, and the summary says which tables were limited
    assert result.status == "passed", result.summary
    assert "1 structure only (tables over drill.heapallindexed_max_mb = 1 MiB: big)" in result.summary
    count = int(result.summary.split(" btree indexes")[0])
    assert f"{count - 1} with heapallindexed" in result.summary


def test_the_structure_check_still_catches_a_corrupt_page(amcheck_cluster: LocalCluster) -> None:
    # WHEN amcheck runs on a database whose 2 MiB table (over the limit) has a garbage index page
    result = amcheck_database(amcheck_cluster.dsn("garbage"), "garbage", heapallindexed_max_mb=1)
    # THEN the structure check alone fails naming the index
    assert result.status == "failed"
    assert result.samples[0]["index"] == "public.big_pkey"
    assert "structure only" in result.summary


def test_orphans_are_counted_and_sampled_reading_the_query_once(amcheck_cluster: LocalCluster) -> None:
    # GIVEN the default suite of a database with 25 orphan rows
    dsn = amcheck_cluster.dsn("orphans")
    specs, decided = plan_default(
        "orphans",
        read_catalog(dsn),
        expected_counts=None,
        count_mode="skip",
        tolerance=0.0,
        reference=datetime.now(UTC),
        max_age_seconds=60,
    )
    assert not decided
    with connection(dsn) as conn:
        conn.execute("SELECT pg_stat_statements_reset()")
    # WHEN it runs with Great Expectations
    results = {r.name: r for r in run_expectations(specs, amcheck_cluster.dsn)}
    # THEN the foreign-key check counts all 25 and samples 20 (without the count column)
    fk = results["fk-orphans orphans.public.child(parent_id)->public.parent"]
    assert fk.status == "failed" and fk.summary == "25 orphan row(s)"
    assert len(fk.samples) == MAX_SAMPLES and all(set(row) == {"parent_id"} for row in fk.samples)
    assert {row["parent_id"] for row in fk.samples} <= set(range(1001, 1026))
    assert results["primary-key orphans.public.child(id)"].status == "passed"
    # AND each check's query ran once: no COUNT(*) second pass as UnexpectedRowsExpectation does
    with connection(dsn) as conn:
        calls = conn.execute(
            "SELECT query, calls FROM pg_stat_statements WHERE query LIKE %s",
            (f"%{'gravl_unexpected_total'}%",),
        ).fetchall()
        recounts = conn.execute(
            "SELECT count(*) FROM pg_stat_statements WHERE query ILIKE %s", ("%unexpected_row_count%",)
        ).fetchone()
    assert len(calls) == 3 and all(n == 1 for _, n in calls), calls  # 2 primary keys, 1 foreign key
    assert recounts == (0,)


def test_the_limit_is_configurable_and_defaults_to_1_gib() -> None:
    assert DrillConfig().heapallindexed_max_mb == 1024
    assert DrillConfig.model_validate({"heapallindexed_max_mb": None}).heapallindexed_max_mb is None
    assert DrillConfig.model_validate({"heapallindexed_max_mb": 0}).heapallindexed_max_mb == 0
    with pytest.raises(ValidationError, match="heapallindexed_max_mb"):
        DrillConfig.model_validate({"heapallindexed_max_mb": -1})
