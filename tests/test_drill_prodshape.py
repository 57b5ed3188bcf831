"""Restore drills of the production-shaped cluster (tests/prodshape.py): no false alarms on good
backups taken as a superuser and as the least-privilege role of infra/postgres/roles.sql while
pgbench writes, and a failed drill naming the object for each injected fault."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import psycopg
import pytest
from drill_helpers import check, copy_backup_with_counts, corrupt_index, failed_names
from prodshape import ProdCluster

from flows.backup import backup_flow
from flows.drill import run_drill
from tasks.drill import DrillReport, before_checks_hook_for_tests, before_start_hook_for_tests
from tasks.pgcluster import LocalCluster

pytestmark = pytest.mark.usefixtures("prefect_harness")


@dataclass
class Backups:
    prod: ProdCluster
    config_su: Path
    config_lp: Path
    physical_su: str
    physical_lp: str
    logical_su: str
    logical_lp: str


@pytest.fixture(scope="module")
def backups(prefect_harness: None, prod_cluster: ProdCluster) -> Iterator[Backups]:
    """Physical and logical backups of the production-shaped cluster, as postgres and as gravl_dr,
    each taken while pgbench writes."""
    prod = prod_cluster
    su = prod.config(user="postgres")
    lp = prod.config(user="gravl_dr")
    ids: dict[str, str] = {}
    runs: tuple[tuple[str, Path, Literal["physical", "logical"]], ...] = (
        ("physical_su", su, "physical"),
        ("physical_lp", lp, "physical"),
        ("logical_su", su, "logical"),
        ("logical_lp", lp, "logical"),
    )
    for name, config, kind in runs:
        with prod.writes(rate=150):
            ids[name] = backup_flow(config_path=str(config), kind=kind).backup_id
    prod.switch_and_wait()
    yield Backups(prod, su, lp, **ids)


def _summary(report: DrillReport) -> str:
    return "\n".join(f"{c.name}: {c.summary}" for c in report.checks if c.failed) + (report.error or "")


@pytest.mark.parametrize("which", ["physical_su", "physical_lp", "logical_su", "logical_lp"])
def test_drill_of_the_production_shaped_cluster_passes(backups: Backups, which: str) -> None:
    config = backups.config_lp if which.endswith("_lp") else backups.config_su
    report = run_drill(str(config), backup=getattr(backups, which))
    assert report.passed, _summary(report)


def test_default_suite_quotes_every_identifier(prod_cluster: ProdCluster) -> None:
    # GIVEN mixed-case, spaced, reserved and non-ASCII names in a UTF8 and a LATIN1 database
    from datetime import UTC, datetime

    from tasks import expectations as gx

    specs = []
    for db in ("shop", "legacy"):
        catalog = gx.read_catalog(prod_cluster.dsn(db))
        db_specs, _ = gx.plan_default(
            db,
            catalog,
            expected_counts=None,
            count_mode="skip",
            tolerance=0,
            reference=datetime.now(UTC),
            max_age_seconds=10**9,
        )
        specs += db_specs
    # WHEN the default suite runs on them
    results = gx.run_expectations(gx.unique_names(specs), lambda db: prod_cluster.dsn(db))
    # THEN every check ran and passed: no "relation public.user does not exist"
    names = {r.name for r in results}
    assert {
        "primary-key shop.public.User(id)",
        "primary-key legacy.public.Kunden(id)",
        "fk-orphans shop.Sales.Order Items(orderId)->Sales.Order",
    } <= names
    assert [(r.name, r.summary) for r in results if r.failed] == []


# ---------------------------------------------------------------- what a green drill has proven


def test_physical_drill_compares_every_database_exactly_at_the_counts_lsn(backups: Backups) -> None:
    # WHEN the physical backup taken as gravl_dr while pgbench wrote is drilled
    report = run_drill(str(backups.config_lp), backup=backups.physical_lp)
    assert report.passed, _summary(report)
    # THEN the counts were compared exactly, paused at the LSN the backup read them at
    assert "paused just before LSN" in check(report, "recovery").summary
    ticks = check(report, "row-count shop.public.ticks")
    assert ticks.status == "passed" and "exactly" in ticks.summary, ticks.summary
    # the RLS table counted in full by the documented role (BYPASSRLS), not 0 = 0
    secrets = check(report, "row-count shop.public.secrets")
    assert "observed 500" in secrets.summary, secrets.summary
    # every counted database, including the LATIN1, read-only and history-only ones
    for name in (
        "row-count legacy.public.Kunden",
        "row-count reports.public.daily_sales",
        "row-count archive.public.orders_2019",
        "freshness archive.public.orders_2019",
        "amcheck reports",
        "amcheck legacy",
        "amcheck frozen",
        "primary-key frozen.public.snapshots(id)",
    ):
        assert check(report, name).status == "passed", name
    # the unlogged table is expected empty, and the report says why
    cache = check(report, "row-count shop.public.session_cache")
    assert cache.status == "passed" and "unlogged" in cache.summary and "by design" in cache.summary
    # a database the source refuses connections to: checked, and its missing counts explained
    frozen = check(report, "row-count frozen")
    assert frozen.status == "skipped" and "datallowconn" in frozen.summary
    coverage = {c.database: c for c in report.databases}
    assert set(coverage) >= {"shop", "legacy", "reports", "frozen", "archive", "postgres"}
    assert any("connections allowed" in n for n in coverage["frozen"].not_checked)
    assert any(c.startswith("amcheck") for c in coverage["frozen"].checked)
    # the drill's own setup fired no event trigger: audit.ddl_log compared exactly, and unchanged
    assert check(report, "row-count shop.audit.ddl_log").status == "passed"


def test_logical_drill_restores_globals_first_and_says_exactly_what_it_skipped(backups: Backups) -> None:
    # WHEN the whole-cluster logical backup taken as gravl_dr is drilled
    report = run_drill(str(backups.config_lp), backup=backups.logical_lp)
    assert report.passed, _summary(report)
    # THEN roles came first (policies TO app_user restored, no statement skipped), every dumped
    # database was checked exactly, the RLS table in full
    assert "globals" in check(report, "restore").summary
    secrets = check(report, "row-count shop.public.secrets")
    assert "observed 500" in secrets.summary and "exactly" in secrets.summary
    for name in (
        "row-count legacy.public.Kunden",
        "row-count reports.public.daily_sales",
        "freshness archive.public.orders_2019",
        "row-count shop.public.session_cache",
    ):
        assert check(report, name).status == "passed", name
    # AND the database nobody may connect to is named as not in the backup, with the reason
    coverage = {c.database: c for c in report.databases}
    assert any("not in this backup" in n for n in coverage["frozen"].not_checked), coverage["frozen"]
    assert check(report, "row-count frozen").status == "skipped"


def test_logical_drill_of_a_one_database_dump_names_what_it_skipped(backups: Backups) -> None:
    # GIVEN a dump of shop alone (backup.databases: [shop]): no roles, no other database
    config = backups.prod.config(
        backups.prod.conf_dir / "one.yaml", user="postgres", backup={"databases": ["shop"]}
    )
    one = backup_flow(config_path=str(config), kind="logical").backup_id
    report = run_drill(str(config), backup=one)
    assert report.passed, _summary(report)
    coverage = {c.database: c for c in report.databases}
    for other in ("legacy", "reports", "archive"):
        assert any("not" in n for n in coverage[other].not_checked), (other, coverage[other])


# ---------------------------------------------------------------- faults: a red drill names the object


def test_drill_fails_naming_an_fk_orphan(backups: Backups) -> None:
    def orphan(cluster: LocalCluster) -> None:
        with psycopg.connect(
            cluster.dsn("shop"), autocommit=True, options="-c session_replication_role=replica"
        ) as conn:
            conn.execute('DELETE FROM "Sales"."Order" WHERE id = 1001')  # its lines stay

    with before_checks_hook_for_tests(orphan):
        report = run_drill(str(backups.config_su), backup=backups.physical_su)
    assert not report.passed
    assert failed_names(report) == ["fk-orphans shop.Sales.Order Items(orderId)->Sales.Order"], _summary(
        report
    )


def test_drill_fails_naming_a_corrupted_index(backups: Backups) -> None:
    def corrupt(cluster: LocalCluster) -> None:
        corrupt_index(cluster, "shop", '"Sales"."Order_pkey"')

    with before_checks_hook_for_tests(corrupt):
        report = run_drill(str(backups.config_su), backup=backups.physical_su)
    assert not report.passed
    amcheck = check(report, "amcheck shop")
    assert amcheck.failed and '"Sales"."Order_pkey"' in amcheck.summary and "corrupt" in amcheck.summary


def test_drill_fails_naming_a_table_with_missing_rows_in_a_second_database(backups: Backups) -> None:
    # GIVEN a backup whose source had 5 more rows in legacy.public.bestellungen than the copy holds
    manifest = json.loads(
        (backups.prod.repo_dir / "backups" / backups.physical_lp / "manifest.json").read_text()
    )
    counts = manifest["row_counts"]
    counts["legacy"]["public.bestellungen"] += 5
    copy_backup_with_counts(
        backups.prod.repo_dir,
        backups.physical_lp,
        backups.physical_lp.replace("physical", "physical-missing"),
        counts,
    )
    report = run_drill(
        str(backups.config_lp), backup=backups.physical_lp.replace("physical", "physical-missing")
    )
    assert failed_names(report) == ["row-count legacy.public.bestellungen"], _summary(report)


def test_physical_drill_fails_naming_a_table_emptied_after_its_count(backups: Backups) -> None:
    # GIVEN the restored copy lost public.reservations' heap (a backup broken in a way
    # pg_verifybackup cannot see once it has run): emptied after its rows were counted
    path = backups.prod.sql("SELECT pg_relation_filepath('public.reservations')")[0][0]

    def lose_table(pgdata: Path) -> None:
        with open(pgdata / path, "r+b") as fh:
            fh.truncate(0)

    with before_start_hook_for_tests(lose_table):
        report = run_drill(str(backups.config_su), backup=backups.physical_su)
    assert not report.passed
    assert "row-count shop.public.reservations" in failed_names(report), _summary(report)
    assert "observed 0" in check(report, "row-count shop.public.reservations").summary


def test_logical_drill_fails_naming_a_table_emptied_after_its_count(backups: Backups) -> None:
    def empty(cluster: LocalCluster) -> None:
        with psycopg.connect(cluster.dsn("shop"), autocommit=True) as conn:
            conn.execute('TRUNCATE "Sales"."Order Items"')

    with before_checks_hook_for_tests(empty):
        report = run_drill(str(backups.config_lp), backup=backups.logical_lp)
    assert failed_names(report) == ["row-count shop.Sales.Order Items"], _summary(report)


def test_a_count_under_row_level_security_is_never_recorded_silently(prod_cluster: ProdCluster) -> None:
    from tasks.counts import read_cluster_facts

    # GIVEN a reader without BYPASSRLS (analyst) and the documented backup role (gravl_dr)
    hidden = read_cluster_facts(prod_cluster.dsn("shop", "analyst"), only=["shop"])
    documented = read_cluster_facts(prod_cluster.dsn("shop", "gravl_dr"))
    # THEN the RLS table is not counted as 0 for the first: it is recorded as not counted, with why
    shop = hidden.databases["shop"]
    assert "public.secrets" not in shop.rows
    assert (
        "row-level security" in shop.not_counted["public.secrets"]
        and "BYPASSRLS" in shop.not_counted["public.secrets"]
    )
    # AND the documented role counts everything, in every database but the one nobody may enter
    assert documented.databases["shop"].rows["public.secrets"] == 500
    assert documented.databases["shop"].not_counted == {}
    assert set(documented.databases) == {"shop", "legacy", "reports", "archive", "postgres"}
    assert "datallowconn" in documented.not_counted["frozen"]
    assert documented.databases["shop"].unlogged == ["public.session_cache"]
    assert documented.lsn and len(set(documented.snapshots.values())) == 1  # a quiet cluster: one snapshot
    assert float(documented.databases["archive"].newest["public.orders_2019"]) == 1577833200.0
